//! What the agent has lost so far, by [`LossSource`]: each rise is logged and exported, never
//! silently absorbed.

use std::collections::BTreeMap;

use meshguard_ebpf::Stat;
use tracing::warn;

use crate::{flow::table::TableStats, kernel::KernelError, loss::LossSource, metrics::Metrics};

#[derive(Default)]
pub(super) struct Losses {
    /// The kernel's counters as last read (losses and the rest).
    kernel: [u64; Stat::COUNT as usize],
    /// The agent's own losses, by source.
    agent: [u64; LossSource::ALL.len()],
}

impl Losses {
    /// Kernel events dropped by a full ring buffer, as last read.
    pub(super) fn ringbuf_full(&self) -> u64 {
        self.kernel[Stat::RingbufFull as usize]
    }

    pub(super) fn count(&self, source: LossSource) -> u64 {
        match Stat::ALL
            .into_iter()
            .find(|&stat| LossSource::of_stat(stat) == Some(source))
        {
            Some(stat) => self.kernel[stat as usize],
            None => self.agent[source as usize],
        }
    }

    pub(super) fn by_source(&self) -> BTreeMap<String, u64> {
        LossSource::ALL
            .into_iter()
            .map(|source| (source.to_string(), self.count(source)))
            .collect()
    }

    /// Counts `n` kernel events that could not be read; says whether they are the first.
    pub(super) fn undecodable(&mut self, n: u64, metrics: &Metrics) -> bool {
        let first = self.agent[LossSource::Undecodable as usize] == 0;
        self.agent[LossSource::Undecodable as usize] += n;
        metrics.count_loss(LossSource::Undecodable, n);
        first
    }

    /// Takes the kernel's counters (`stats`, as read now) and the table's, and exports what
    /// rose since the last time.
    pub(super) fn report(
        &mut self,
        stats: Result<[u64; Stat::COUNT as usize], KernelError>,
        table: TableStats,
        metrics: &Metrics,
    ) {
        match stats {
            Ok(now) => {
                for stat in Stat::ALL {
                    let (before, after) = (self.kernel[stat as usize], now[stat as usize]);
                    let Some(source) = LossSource::of_stat(stat) else {
                        continue;
                    };
                    if after > before {
                        warn!(counter = ?stat, total = after, new = after - before, "kernel-side loss");
                        metrics.count_loss(source, after - before);
                    }
                }
                self.kernel = now;
            }
            Err(e) => warn!(%e, "cannot read kernel counters"),
        }
        if self.rise(LossSource::FlowEvictedUnseen, table.lost_unseen, metrics) {
            warn!(
                total = table.lost_unseen,
                "flows evicted from the kernel's map before the agent saw them: only their addresses are known"
            );
        }
        if self.rise(LossSource::AgentTableEvicted, table.evicted, metrics) {
            warn!(
                total = table.evicted,
                "flows evicted from the agent's table before they closed"
            );
        }
    }

    /// Takes the new `total` of one of the agent's losses; exports and says whether it rose.
    fn rise(&mut self, source: LossSource, total: u64, metrics: &Metrics) -> bool {
        let seen = &mut self.agent[source as usize];
        if total <= *seen {
            return false;
        }
        metrics.count_loss(source, total - *seen);
        *seen = total;
        true
    }
}
