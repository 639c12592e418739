//! Where a session's effects are collected while the shard runs it: bytes for its client (with
//! the frames they hold, counted as the session writes them), pod-link messages for its agent,
//! and flow-control events counted in the metrics.

use super::super::metrics::{self, ShardMetrics};
use super::clients::Written;
use crate::podlink::{self, Msg as PodMsg};
use crate::proto::ErrorCode;
use crate::session::{FlowEvent, Sink};
use std::sync::Arc;

/// Where a session's effects are collected before they are sent.
pub(super) struct Scratch {
    pub(super) client: Vec<u8>,
    /// Frames in `client`, and the codes of the ERROR frames among them.
    pub(super) frames: Written,
    pub(super) pod: Vec<u8>,
    /// Where flow-control events are counted.
    pub(super) metrics: Arc<metrics::Metrics>,
    pub(super) shard: usize,
}

impl Sink for Scratch {
    fn client(&mut self) -> &mut Vec<u8> {
        &mut self.client
    }
    fn frame_written(&mut self, error: Option<ErrorCode>) {
        self.frames.frames += 1;
        if let Some(code) = error {
            self.frames.errors.push(code);
        }
    }
    fn pod(&mut self, session_id: u32, msg: PodMsg<'_>) {
        podlink::encode(&mut self.pod, session_id, &msg);
    }
    fn flow(&mut self, ev: FlowEvent) {
        let m = &self.metrics.shards[self.shard];
        match ev {
            FlowEvent::Unacknowledged => ShardMetrics::inc(&m.unacked_connections, 1),
            FlowEvent::DroppedAttached(n) => ShardMetrics::inc(&m.dropped_attached, n.into()),
            FlowEvent::DroppedSuspended(n) => ShardMetrics::inc(&m.dropped_suspended, n.into()),
        }
    }
}
