//! The pod link (daemon ↔ agent pod), see `docs/POD-LINK.md`.
//!
//! * [`codec`]: message framing and typed bodies.

pub mod codec;

pub use codec::{
    decode, encode, CloseReason, DecodeError, Decoded, Msg, MsgType, Open, HEADER_LEN, MAX_BODY,
    VERSION, VERSION_MIGRATE,
};
