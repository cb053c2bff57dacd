import PhatgooseRuntime
import Synchronization

/// Time and work per participant and phase kind, and per layer, summed over a run.
/// How reports name participant `p` of a runtime whose pool has `pool` participants (the caller and its workers):
/// "caller", "worker p", or, past the pool, "lane l" (the holders of dispatch lane l > 0, which report after the
/// workers).
public func participantLabel(_ p: Int, pool: Int) -> String {
    p == 0 ? "caller" : p < pool ? "worker \(p)" : "lane \(p - pool + 1)"
}

public struct PhaseTotals: Sendable, Equatable {
    /// One participant's sums.
    public struct Participant: Sendable, Equatable {
        /// Nanoseconds per `RuntimeEvent.Kind` (indexed by ``PhaseTotals/kindIndex(_:)``).
        public var nanoseconds: [UInt64] = [UInt64](repeating: 0, count: PhaseTotals.kinds.count)
        public var events: [Int] = [Int](repeating: 0, count: PhaseTotals.kinds.count)
        /// Rows of items and steals this participant ran.
        public var itemRows: Int = 0

        /// Time spent computing: routing, plan, items, steals and combine (not queueing, waiting or the whole-call
        /// span that contains the others).
        public var busyNanoseconds: UInt64 {
            PhaseTotals.busyKinds.reduce(0) { $0 + nanoseconds[PhaseTotals.kindIndex($1)] }
        }

        public subscript(kind: RuntimeEvent.Kind) -> UInt64 { nanoseconds[PhaseTotals.kindIndex(kind)] }
    }

    /// One layer's calls.
    public struct Layer: Sendable, Equatable {
        public var calls: Int = 0
        public var tokens: Int = 0
        public var nanoseconds: UInt64 = 0
    }

    public var participants: [Participant]
    public var layers: [Layer]
    /// Calls that waited for the executor, their total and longest wait.
    public var queuedCalls: Int = 0
    public var queuedNanoseconds: UInt64 = 0
    public var longestQueuedNanoseconds: UInt64 = 0

    /// Every kind, in a fixed order.
    public static let kinds: [RuntimeEvent.Kind] = [.queued, .routing, .plan, .item, .steal, .wait, .combine, .call]
    /// The kinds that are work (a participant is busy during them).
    public static let busyKinds: [RuntimeEvent.Kind] = [.routing, .plan, .item, .steal, .combine]

    @inline(__always)
    public static func kindIndex(_ kind: RuntimeEvent.Kind) -> Int {
        switch kind {
        case .queued: return 0
        case .routing: return 1
        case .plan: return 2
        case .item: return 3
        case .steal: return 4
        case .wait: return 5
        case .combine: return 6
        case .call: return 7
        }
    }

    public init(participants: Int, layers: Int) {
        self.participants = [Participant](repeating: Participant(), count: participants)
        self.layers = [Layer](repeating: Layer(), count: layers)
    }

    /// The sums accumulated since `earlier` (a snapshot of the same accounting). The longest wait is the later one's.
    public func subtracting(_ earlier: PhaseTotals) -> PhaseTotals {
        var result = self
        for p in participants.indices where p < earlier.participants.count {
            for k in PhaseTotals.kinds.indices {
                result.participants[p].nanoseconds[k] -= min(result.participants[p].nanoseconds[k], earlier.participants[p].nanoseconds[k])
                result.participants[p].events[k] -= min(result.participants[p].events[k], earlier.participants[p].events[k])
            }
            result.participants[p].itemRows -= min(result.participants[p].itemRows, earlier.participants[p].itemRows)
        }
        for l in layers.indices where l < earlier.layers.count {
            result.layers[l].calls -= earlier.layers[l].calls
            result.layers[l].tokens -= earlier.layers[l].tokens
            result.layers[l].nanoseconds -= min(result.layers[l].nanoseconds, earlier.layers[l].nanoseconds)
        }
        result.queuedCalls -= earlier.queuedCalls
        result.queuedNanoseconds -= min(result.queuedNanoseconds, earlier.queuedNanoseconds)
        return result
    }

    /// Calls (whole layer calls) in these totals.
    public var calls: Int { layers.reduce(0) { $0 + $1.calls } }
}

/// Sums every event by participant and kind, and whole calls by layer: the always-on, fixed-memory accounting behind
/// worker utilisation and the phase breakdown (about 30 ns per event).
///
/// # Thread safety
/// Events of one participant are summed under that participant's own `Locked` (pthread), so the calling thread and the workers
/// never contend with each other; whole-call and queueing sums sit under a separate `Locked` (pthread) taken once per call.
/// Events naming a participant or layer beyond the sizes given at `init` are ignored.
public final class PhaseAccounting: RuntimeObserver, Sendable {
    private final class Shard: Sendable {
        let totals = Locked(PhaseTotals.Participant())
    }

    private struct CallTotals {
        var layers: [PhaseTotals.Layer]
        var queuedCalls = 0
        var queuedNanoseconds: UInt64 = 0
        var longestQueued: UInt64 = 0
    }

    private let shards: [Shard]
    private let calls: Locked<CallTotals>
    public let layerCount: Int

    /// Accounting for `participants` participants (workers plus the caller) and `layers` modules.
    public init(participants: Int, layers: Int) {
        shards = (0..<max(1, participants)).map { _ in Shard() }
        layerCount = layers
        calls = Locked(CallTotals(layers: [PhaseTotals.Layer](repeating: PhaseTotals.Layer(), count: layers)))
    }

    public func observe(_ event: RuntimeEvent) {
        let duration = event.end &- event.start
        switch event.kind {
        case .call:
            guard event.layer >= 0 && event.layer < layerCount else { return }
            calls.withLock { totals in
                totals.layers[event.layer].calls += 1
                totals.layers[event.layer].tokens += event.rows
                totals.layers[event.layer].nanoseconds += duration
            }
        case .queued:
            calls.withLock { totals in
                totals.queuedCalls += 1
                totals.queuedNanoseconds += duration
                totals.longestQueued = max(totals.longestQueued, duration)
            }
        default:
            break
        }
        guard event.worker >= 0 && event.worker < shards.count else { return }
        let k = PhaseTotals.kindIndex(event.kind)
        let rows = event.kind == .item || event.kind == .steal ? event.rows : 0
        shards[event.worker].totals.withLock { totals in
            totals.nanoseconds[k] &+= duration
            totals.events[k] += 1
            totals.itemRows += rows
        }
    }

    /// The sums so far.
    public func snapshot() -> PhaseTotals {
        var result = PhaseTotals(participants: shards.count, layers: layerCount)
        for (p, shard) in shards.enumerated() { result.participants[p] = shard.totals.withLock { $0 } }
        calls.withLock { totals in
            result.layers = totals.layers
            result.queuedCalls = totals.queuedCalls
            result.queuedNanoseconds = totals.queuedNanoseconds
            result.longestQueuedNanoseconds = totals.longestQueued
        }
        return result
    }
}
