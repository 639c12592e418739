//! The shard's session table: sessions in a paged slab (no per-session task, no large
//! reallocations), indexed by session id; ids that encode the owning shard; resume tokens.

use super::state::Session;
use rand::{rngs::StdRng, RngCore, SeedableRng};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// How session ids encode their shard: the low `bits` bits are the shard index, the rest random.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct IdSpace {
    bits: u32,
    shard: u32,
    /// In a cluster: this node's ordinal (1 ..= 255), the id's top 8 bits, so nodes never
    /// issue the same id (docs/CLUSTER.md); 0 on a node of its own (all bits random).
    node: u8,
}

impl IdSpace {
    /// The id space of `shard` among `shards` (1 ..= 256).
    pub fn new(shard: usize, shards: usize) -> IdSpace {
        assert!(
            (1..=256).contains(&shards) && shard < shards,
            "shard {shard} of {shards}"
        );
        let bits = usize::BITS - (shards - 1).leading_zeros();
        IdSpace {
            bits,
            shard: shard as u32,
            node: 0,
        }
    }

    /// The same space with the node's cluster ordinal in the top 8 bits (1 ..= 255; 0 = none).
    pub fn with_node(self, node: u8) -> IdSpace {
        IdSpace { node, ..self }
    }

    /// The node ordinal an id carries (0 for ids of a node outside a cluster).
    pub fn node(&self) -> u8 {
        self.node
    }

    /// The shard that owns `id` (may be ≥ the shard count for an id that was never issued).
    pub fn owner(&self, id: u32) -> usize {
        (id & ((1u32 << self.bits) - 1)) as usize
    }

    /// An id of this shard made from random bits; never 0.
    pub fn make(&self, random: u32) -> Option<u32> {
        let mut id = (random << self.bits) | self.shard;
        if self.node != 0 {
            id = (id & 0x00FF_FFFF) | (u32::from(self.node) << 24);
        }
        (id != 0).then_some(id)
    }
}

/// A fast multiplicative hasher for small integer keys: session ids (random high bits, shard in
/// the low bits) and connection ids. Not for keys a peer chooses freely.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        // Combines with what was written before, so multi-field keys hash every field.
        self.0 = (self.0.rotate_left(26) ^ v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    // Whole integers in one step rather than byte by byte through `write` (enum keys hash
    // their discriminant as an isize): same mixing, a fraction of the instructions.
    fn write_u8(&mut self, v: u8) {
        self.write_u32(v as u32);
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u32(v as u32);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(26) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn write_isize(&mut self, v: isize) {
        self.write_u64(v as u64);
    }
}

const PAGE: usize = 512;

/// The table of one shard's sessions.
///
/// `R` is the source of session ids and resume tokens: [`SessionTable::new`] uses [`StdRng`]
/// (ChaCha) seeded from the operating system, the only choice for a server. Tests inject a
/// seeded one, or one that repeats values on purpose to exercise the id-collision retry. The
/// type parameter is resolved at compile time: the production path costs nothing for it.
pub struct SessionTable<R = StdRng> {
    pages: Vec<Vec<Option<Session>>>,
    free: Vec<u32>,
    index: HashMap<u32, u32, BuildHasherDefault<IdHasher>>,
    ids: IdSpace,
    rng: R,
}

impl SessionTable<StdRng> {
    /// An empty table for `ids`, with its CSPRNG seeded from the operating system.
    pub fn new(ids: IdSpace) -> SessionTable<StdRng> {
        SessionTable::with_rng(ids, StdRng::from_entropy())
    }
}

impl<R: RngCore> SessionTable<R> {
    /// An empty table drawing ids and resume tokens from `rng` (tests use a seeded one, or a
    /// scripted one; a server must use a CSPRNG, as [`SessionTable::new`] does).
    pub fn with_rng(ids: IdSpace, rng: R) -> SessionTable<R> {
        SessionTable {
            pages: Vec::new(),
            free: Vec::new(),
            index: HashMap::default(),
            ids,
            rng,
        }
    }

    /// The id space this table issues ids from.
    pub fn ids(&self) -> IdSpace {
        self.ids
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No sessions held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// 128 random bits from the CSPRNG (resume tokens).
    pub fn random_token(&mut self) -> [u8; 16] {
        let mut t = [0u8; 16];
        self.rng.fill_bytes(&mut t);
        t
    }

    /// A fresh id: random, non-zero, of this shard, not in use.
    pub fn fresh_id(&mut self) -> u32 {
        loop {
            if let Some(id) = self.ids.make(self.rng.next_u32()) {
                if !self.index.contains_key(&id) {
                    return id;
                }
            }
        }
    }

    /// Creates a session with a fresh id and resume token; `make` builds it from those.
    pub fn create(&mut self, make: impl FnOnce(u32, [u8; 16]) -> Session) -> &mut Session {
        let id = self.fresh_id();
        let token = self.random_token();
        let session = make(id, token);
        debug_assert_eq!(session.id(), id);
        self.place(session)
    }

    /// Adds a session made elsewhere (restored from a state dir, handed over by another
    /// process), keeping its id. `None` when a session with that id is already here.
    pub fn insert(&mut self, session: Session) -> Option<&mut Session> {
        if self.index.contains_key(&session.id()) {
            return None;
        }
        Some(self.place(session))
    }

    fn place(&mut self, session: Session) -> &mut Session {
        let id = session.id();
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                if self.pages.last().is_none_or(|p| p.len() == PAGE) {
                    self.pages.push(Vec::with_capacity(PAGE));
                }
                let p = self.pages.len() - 1;
                self.pages[p].push(None);
                (p * PAGE + self.pages[p].len() - 1) as u32
            }
        };
        self.index.insert(id, slot);
        let cell = &mut self.pages[slot as usize / PAGE][slot as usize % PAGE];
        cell.insert(session)
    }

    /// The session `id`, if present.
    pub fn get(&self, id: u32) -> Option<&Session> {
        let slot = *self.index.get(&id)? as usize;
        self.pages[slot / PAGE][slot % PAGE].as_ref()
    }

    /// The session `id`, mutably, if present.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Session> {
        let slot = *self.index.get(&id)? as usize;
        self.pages[slot / PAGE][slot % PAGE].as_mut()
    }

    /// The session `id` if `token` is its resume token (constant-time comparison). Unknown id
    /// and wrong token give the same `None`.
    pub fn get_with_token(&mut self, id: u32, token: &[u8; 16]) -> Option<&mut Session> {
        use subtle::ConstantTimeEq;
        let s = self.get_mut(id)?;
        bool::from(s.resume_token().ct_eq(token)).then_some(s)
    }

    /// Removes the session `id`, returning it; its slot is reused.
    pub fn remove(&mut self, id: u32) -> Option<Session> {
        let slot = self.index.remove(&id)?;
        self.free.push(slot);
        self.pages[slot as usize / PAGE][slot as usize % PAGE].take()
    }

    /// Every session id (for shutdown and metrics).
    pub fn ids_iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.index.keys().copied()
    }

    /// Every session, in slot order: a sequential walk of the pages, no id lookups (the
    /// once-a-second gauges walk all of a shard's sessions).
    pub fn iter(&self) -> impl Iterator<Item = &Session> + '_ {
        self.pages.iter().flat_map(|p| p.iter().flatten())
    }

    /// Heap bytes the table's own structures hold (not the sessions' rings).
    pub fn heap_bytes(&self) -> usize {
        self.pages
            .iter()
            .map(|p| p.capacity() * std::mem::size_of::<Option<Session>>())
            .sum::<usize>()
            + self.pages.capacity() * std::mem::size_of::<Vec<Option<Session>>>()
            + self.free.capacity() * 4
            + self.index.capacity() * (8 + 1)
    }
}

/// A `HashMap` keyed by small integers, hashed with [`IdHasher`].
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// A `HashSet` of small integers, hashed with [`IdHasher`].
pub type IdSet<K> = std::collections::HashSet<K, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;

    #[test]
    fn iter_walks_exactly_the_live_sessions() {
        let mut t = SessionTable::with_rng(IdSpace::new(0, 1), StdRng::seed_from_u64(7));
        let mut ids = Vec::new();
        for _ in 0..1300 {
            let s = t.create(|id, tok| Session::new(id, 1, 1, 0, tok, 0));
            ids.push(s.id());
        }
        for id in ids.iter().step_by(3) {
            assert!(t.remove(*id).is_some());
        }
        let mut walked: Vec<u32> = t.iter().map(|s| s.id()).collect();
        let mut want: Vec<u32> = t.ids_iter().collect();
        walked.sort_unstable();
        want.sort_unstable();
        assert_eq!(walked, want);
        assert_eq!(walked.len(), 1300 - 1300_usize.div_ceil(3));
    }
}

#[cfg(test)]
mod node_ids {
    use super::*;

    /// In a cluster every id carries the node's ordinal in its top byte and still names its
    /// shard in the low bits, so two nodes never issue the same id.
    #[test]
    fn cluster_ids_carry_the_node_and_the_shard() {
        let mut rng = StdRng::seed_from_u64(7);
        for shards in [1usize, 3, 4, 256] {
            for shard in [0, shards - 1] {
                let sp = IdSpace::new(shard, shards).with_node(42);
                for _ in 0..1000 {
                    let Some(id) = sp.make(rng.next_u32()) else {
                        continue;
                    };
                    assert_eq!(id >> 24, 42);
                    assert_eq!(sp.owner(id), shard);
                }
            }
        }
        let other = IdSpace::new(0, 4).with_node(43);
        assert_eq!(other.make(u32::MAX).map(|i| i >> 24), Some(43));
        assert_eq!(IdSpace::new(0, 4).node(), 0);
    }
}
