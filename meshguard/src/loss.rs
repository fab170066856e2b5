//! Where events and flows are lost, named once: the kernel's counters and the agent's own
//! losses, as `meshguard_events_lost_total{source}`, the status's `events_lost` and `meshguard
//! status` name them.

use meshguard_ebpf::Stat;

use crate::wire::wire_enum;

wire_enum! {
    pub enum LossSource("loss source") {
        /// Kernel events dropped by a full ring buffer.
        RingbufFull = "ringbuf_full",
        /// Flows the kernel's flow map refused.
        FlowMapFull = "flow_map_full",
        /// Open flows evicted from the kernel's flow map.
        FlowEvicted = "flow_evicted",
        /// Kernel events the agent could not read.
        Undecodable = "undecodable",
        /// Open flows dropped from the agent's table to make room.
        AgentTableEvicted = "agent_table_evicted",
        /// Flows evicted from the kernel's map before the agent saw any of their events.
        FlowEvictedUnseen = "flow_evicted_unseen",
    }
}

impl LossSource {
    /// The loss a kernel counter counts; `None` for counters of what is not a loss.
    pub fn of_stat(stat: Stat) -> Option<Self> {
        match stat {
            Stat::RingbufFull => Some(LossSource::RingbufFull),
            Stat::FlowMapFull => Some(LossSource::FlowMapFull),
            Stat::FlowEvicted => Some(LossSource::FlowEvicted),
            Stat::FlowMidstream | Stat::PacketUnreadable => None,
        }
    }

    /// `n` of them as a person on call reads it: what was lost, what it costs.
    pub fn in_words(self, n: u64) -> String {
        match self {
            LossSource::RingbufFull => format!(
                "{n} kernel events dropped by a full ring buffer (their flows are recovered from the flow map; raise --ringbuf-bytes if this grows)"
            ),
            LossSource::FlowMapFull => {
                format!("{n} flows not tracked: the kernel's flow map refused them")
            }
            LossSource::FlowEvicted => format!(
                "{n} flows evicted from the kernel's flow map while open: their byte counts stop early (raise --flow-map-size)"
            ),
            LossSource::FlowEvictedUnseen => format!(
                "{n} flows evicted before the agent saw them: only their addresses are known, no verdict"
            ),
            LossSource::Undecodable => format!(
                "{n} kernel events unreadable (an agent and programs of different versions?)"
            ),
            LossSource::AgentTableEvicted => format!(
                "{n} open flows dropped from the agent's table to make room (raise --max-flows)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_reads_back_and_every_kernel_loss_has_one() {
        for source in LossSource::ALL {
            assert_eq!(source.as_str().parse(), Ok(source));
            assert!(source.in_words(3).starts_with("3 "), "{source}");
        }
        let kernel: Vec<_> = Stat::ALL
            .into_iter()
            .filter_map(LossSource::of_stat)
            .collect();
        assert_eq!(
            kernel,
            [
                LossSource::RingbufFull,
                LossSource::FlowMapFull,
                LossSource::FlowEvicted
            ]
        );
        assert!("flow_lost".parse::<LossSource>().is_err());
    }
}
