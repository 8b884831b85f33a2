//! Adaptive chunking: how many items go into one task.
//!
//! Tiny tasks must be batched, or per-message overhead dominates; long tasks must go one by one,
//! or one worker sits on a chunk while others idle. The policy learns the cost of one item from
//! the compute times that workers report, and sizes chunks so that one chunk takes about
//! [`ChunkPolicy::target_ns`]. When the number of remaining items is known, chunks also shrink
//! towards the end so that the last ones finish together (a small tail).
//!
//! Until the first measurement arrives the policy sends single items: a first chunk of 1 costs
//! one round trip for tiny tasks, while a first chunk of 64 long tasks could cost minutes.

/// Running estimate of the compute time of one item.
///
/// An exponentially decaying average weighted by item count, so that one large chunk counts more
/// than a single-item probe (whose time is mostly fixed overhead).
#[derive(Debug, Clone, Default)]
pub struct ItemTimer {
    weighted_ns: f64,
    weight: f64,
    /// The estimate is a hint carried over from an earlier call, not yet confirmed by a
    /// measurement of this one.
    hinted: bool,
}

/// The weight of a hint, in items (it only has to be non-zero: the first measurement
/// replaces it).
const HINT_WEIGHT: f64 = 1.0;

/// Items an estimate must rest on (by weight) to become a hint, unless items are slow.
const HINT_MIN_ITEMS: f64 = 32.0;

/// Per-item cost above which even one item's measurement is a fair hint (the fixed cost of a
/// chunk is then a small share of it).
const HINT_TRUSTED_NS: f64 = 200_000.0;

/// How quickly old measurements fade; 0.5 halves their weight at every new report.
const DECAY: f64 = 0.5;

impl ItemTimer {
    /// Records that `items` items took `elapsed_ns` nanoseconds in total.
    pub fn record(&mut self, items: u64, elapsed_ns: u64) {
        if self.hinted {
            // This call's own first measurement: the hint has done its job.
            *self = ItemTimer::default();
        }
        let items = items.max(1) as f64;
        self.weighted_ns = self.weighted_ns * DECAY + elapsed_ns as f64;
        self.weight = self.weight * DECAY + items;
    }

    /// A timer that starts from `per_item_ns`, the cost an earlier call of the same function
    /// measured: chunks can be sized at once instead of probing with single items. The first
    /// real measurement replaces it.
    pub fn hinted(per_item_ns: f64) -> Self {
        ItemTimer {
            weighted_ns: per_item_ns.max(0.0) * HINT_WEIGHT,
            weight: HINT_WEIGHT,
            hinted: true,
        }
    }

    /// Estimated nanoseconds per item, or `None` before any measurement or hint.
    pub fn per_item_ns(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.weighted_ns / self.weight)
    }

    /// Whether the estimate is only a hint (no chunk of this setup has reported yet).
    pub fn is_hint(&self) -> bool {
        self.hinted
    }

    /// The estimate measured in this setup (`None` while there is only a hint or nothing).
    pub fn measured_ns(&self) -> Option<f64> {
        if self.hinted {
            None
        } else {
            self.per_item_ns()
        }
    }

    /// The measured estimate, if it can size another call's chunks ([`ItemTimer::hinted`]).
    ///
    /// A chunk's time includes a fixed cost (unpacking, packing: some µs), which a few
    /// cheap items cannot outweigh: a call of 8 no-op items measures each at several µs, 100
    /// times too much, and a hint from it would start the next, large call of the same
    /// function with chunks 100 times too small. Such an estimate is not carried over.
    pub fn hint_ns(&self) -> Option<f64> {
        let ns = self.measured_ns()?;
        (self.weight >= HINT_MIN_ITEMS || ns >= HINT_TRUSTED_NS).then_some(ns)
    }
}

/// Parameters of the chunk-size policy.
#[derive(Debug, Clone, Copy)]
pub struct ChunkPolicy {
    /// Wanted compute time of one chunk, in nanoseconds.
    pub target_ns: u64,
    /// Smallest worthwhile compute time of a chunk, in nanoseconds. Shrinking the tail below
    /// this buys no balance (the chunks are already short) and costs round trips. A few round
    /// trips long (one costs a worker about 30-100 us): a coarser floor leaves one worker
    /// alone with a long last chunk, which on a call of a few ms is a large share of it.
    pub min_ns: u64,
    /// Upper bound on items per chunk (bounds memory per message).
    pub max_items: usize,
    /// When the remaining count is known, at least this many chunks per worker are left for the
    /// tail, so the end of a call balances.
    pub tail_chunks_per_worker: usize,
}

impl Default for ChunkPolicy {
    fn default() -> Self {
        ChunkPolicy {
            target_ns: 4_000_000,
            min_ns: 250_000,
            max_items: 50_000,
            tail_chunks_per_worker: 2,
        }
    }
}

impl ChunkPolicy {
    /// Items for the next chunk.
    ///
    /// `per_item_ns` is the current estimate ([`ItemTimer::per_item_ns`]), `remaining` the number
    /// of items not yet sent if known, `workers` the pool size.
    pub fn chunk_size(
        &self,
        per_item_ns: Option<f64>,
        remaining: Option<u64>,
        workers: usize,
    ) -> usize {
        let Some(per_item) = per_item_ns else {
            return 1;
        };
        let per_item = per_item.max(1.0);
        let by_time = (self.target_ns as f64 / per_item).floor() as usize;
        let mut size = by_time;
        if let Some(left) = remaining {
            let slots = (workers.max(1) * self.tail_chunks_per_worker.max(1)) as u64;
            let tail_cap = left.div_ceil(slots).max(1);
            let floor = (self.min_ns as f64 / per_item).floor() as usize;
            size = size
                .min((tail_cap as usize).max(floor))
                .min(left.max(1) as usize);
        }
        size.clamp(1, self.max_items.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_cost_sends_single_items() {
        let p = ChunkPolicy::default();
        assert_eq!(p.chunk_size(None, Some(1_000_000), 8), 1);
        assert_eq!(p.chunk_size(None, None, 8), 1);
    }

    #[test]
    fn tiny_items_are_batched_up_to_the_cap() {
        let p = ChunkPolicy::default();
        // 100 ns per item: 4 ms / 100 ns = 40,000 items.
        assert_eq!(p.chunk_size(Some(100.0), None, 2), 40_000);
        // 1 ns per item would be 4 million: capped.
        assert_eq!(p.chunk_size(Some(1.0), None, 2), p.max_items);
    }

    #[test]
    fn long_items_go_one_by_one() {
        let p = ChunkPolicy::default();
        assert_eq!(p.chunk_size(Some(10e6), Some(10_000), 4), 1);
        assert_eq!(p.chunk_size(Some(50e6), None, 4), 1);
    }

    #[test]
    fn tail_shrinks_chunks_near_the_end() {
        let p = ChunkPolicy::default();
        // 100 us items: 40 per chunk by time; near the end, a quarter of what is left...
        assert_eq!(p.chunk_size(Some(100_000.0), Some(1_000), 2), 40);
        assert_eq!(p.chunk_size(Some(100_000.0), Some(80), 2), 20);
        // ...but never under 250 us of work (2 items) while that many remain.
        assert_eq!(p.chunk_size(Some(100_000.0), Some(20), 2), 5);
        assert_eq!(p.chunk_size(Some(100_000.0), Some(6), 2), 2);
        assert_eq!(p.chunk_size(Some(100_000.0), Some(3), 2), 2);
        assert_eq!(p.chunk_size(Some(100_000.0), Some(1), 2), 1);
        assert_eq!(p.chunk_size(Some(100_000.0), Some(0), 2), 1);
        // 10 ms items: one by one to the very end.
        assert_eq!(p.chunk_size(Some(10e6), Some(3), 2), 1);
    }

    #[test]
    fn tiny_items_do_not_crawl_through_the_tail() {
        let p = ChunkPolicy::default();
        // 50 ns items: 250 us is 5,000 items, so the last 5,000 go in one chunk, not in dozens.
        assert_eq!(p.chunk_size(Some(50.0), Some(100_000), 2), 25_000);
        assert_eq!(p.chunk_size(Some(50.0), Some(30_000), 2), 7_500);
        assert_eq!(p.chunk_size(Some(50.0), Some(8_000), 2), 5_000);
        assert_eq!(p.chunk_size(Some(50.0), Some(4_000), 2), 4_000);
    }

    #[test]
    fn a_hint_sizes_chunks_until_the_first_measurement_replaces_it() {
        let mut t = ItemTimer::hinted(100.0);
        assert!(t.is_hint());
        assert_eq!(t.per_item_ns(), Some(100.0));
        assert_eq!(t.measured_ns(), None);
        t.record(10, 10_000_000); // 1 ms per item now
        assert!(!t.is_hint());
        assert_eq!(t.measured_ns(), Some(1_000_000.0));
    }

    #[test]
    fn an_estimate_from_a_few_cheap_items_is_no_hint() {
        let mut t = ItemTimer::default();
        t.record(1, 20_000);
        t.record(4, 40_000);
        assert!(t.measured_ns().is_some());
        assert_eq!(t.hint_ns(), None); // 8 us per item from a handful of items: overhead
        t.record(40_000, 2_000_000);
        assert!(t.hint_ns().unwrap() < 100.0);
        let mut slow = ItemTimer::default();
        slow.record(1, 50_000_000); // one item of 50 ms: overhead is noise
        assert_eq!(slow.hint_ns(), Some(50_000_000.0));
    }

    #[test]
    fn timer_weights_by_items_and_forgets() {
        let mut t = ItemTimer::default();
        assert!(t.per_item_ns().is_none());
        // A single-item probe that is mostly overhead...
        t.record(1, 50_000);
        assert_eq!(t.per_item_ns(), Some(50_000.0));
        // ...is quickly outweighed by a large chunk.
        t.record(10_000, 2_000_000);
        let est = t.per_item_ns().unwrap();
        assert!(est < 210.0, "{est}");
        // Old data fades: a change of regime is followed.
        for _ in 0..20 {
            t.record(10, 10_000_000);
        }
        let est = t.per_item_ns().unwrap();
        assert!((est - 1_000_000.0).abs() < 1_000.0, "{est}");
    }
}
