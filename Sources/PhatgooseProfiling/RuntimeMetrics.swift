import CoreMetrics
import PhatgooseRuntime
import Synchronization

/// The runtime's figures as swift-metrics, for serving stacks: the runtime itself never imports a metrics library;
/// this observer turns its events, and periodic `statisticsSnapshot()`s, into metrics of whatever backend the
/// factory stands for (Prometheus, StatsD, OpenTelemetry...).
///
/// | metric | kind | from |
/// |---|---|---|
/// | `phatgoose_calls_total` | counter | statistics: layer calls served |
/// | `phatgoose_tokens_total` | counter | statistics: tokens routed |
/// | `phatgoose_expert_tokens_total{expert}` | counter | statistics: token assignments per expert |
/// | `phatgoose_rejected_calls_total` | counter | statistics: calls refused by admission control |
/// | `phatgoose_queue_depth` | gauge | the caller's count of calls waiting (``sample(_:queueDepth:)``) |
/// | `phatgoose_busy_workers` | gauge | events: participants computing, averaged since the last sample |
/// | `phatgoose_call_duration_seconds` | timer | events: each layer call |
/// | `phatgoose_queue_wait_seconds` | timer | events: each call's wait for the executor |
///
/// Timers need the runtime to report events, so install this as (or in an ``ObserverFanout`` as) the runtime's
/// observer; counters and gauges move when ``sample(_:queueDepth:)`` is called (say once a second).
///
/// # Thread safety
/// `observe` runs on the runtime's threads: it records into the timers (the backend's handlers are thread-safe by
/// the swift-metrics contract) and adds busy time to an atomic. `sample` may run on any thread; its state (the last
/// statistics seen and the per-expert counters) sits under a `Locked` (pthread).
public final class RuntimeMetrics: RuntimeObserver, Sendable {
    public static let prefix = "phatgoose"

    private let factory: any MetricsFactory
    private let calls: Counter
    private let tokens: Counter
    private let rejected: Counter
    private let queueDepth: Gauge
    private let busyWorkers: Gauge
    private let callDuration: CoreMetrics.Timer
    private let queueWait: CoreMetrics.Timer
    private let busyNanoseconds = Atomic<UInt64>(0)
    private let state: Locked<State>

    private struct State {
        var last: RuntimeStatistics?
        var expertNames: [String]
        var expertCounters: [Counter] = []
        var lastSample: UInt64
        var lastBusy: UInt64 = 0
    }

    /// Metrics from `factory`; `expertNames` label the per-expert counters (experts added later are labelled by index).
    public init(factory: any MetricsFactory, expertNames: [String]) {
        self.factory = factory
        let p = Self.prefix
        calls = Counter(label: "\(p)_calls_total", factory: factory)
        tokens = Counter(label: "\(p)_tokens_total", factory: factory)
        rejected = Counter(label: "\(p)_rejected_calls_total", factory: factory)
        queueDepth = Gauge(label: "\(p)_queue_depth", factory: factory)
        busyWorkers = Gauge(label: "\(p)_busy_workers", factory: factory)
        callDuration = CoreMetrics.Timer(label: "\(p)_call_duration_seconds", factory: factory)
        queueWait = CoreMetrics.Timer(label: "\(p)_queue_wait_seconds", factory: factory)
        state = Locked(State(expertNames: expertNames, lastSample: MonotonicClock.now()))
    }

    public func observe(_ event: RuntimeEvent) {
        let duration = event.end &- event.start
        switch event.kind {
        case .call: callDuration.recordNanoseconds(Int64(clamping: duration))
        case .queued: queueWait.recordNanoseconds(Int64(clamping: duration))
        case .routing, .plan, .item, .steal, .combine: busyNanoseconds.add(duration, ordering: .relaxed)
        case .wait: break
        }
    }

    /// Moves the counters to `statistics` (a `Runtime.statisticsSnapshot()`), sets the queue depth, and sets busy
    /// workers to the average number computing since the previous sample.
    public func sample(_ statistics: RuntimeStatistics, queueDepth depth: Int) {
        let now = MonotonicClock.now()
        let busy = busyNanoseconds.load(ordering: .relaxed)
        state.withLock { state in
            calls.increment(by: max(0, statistics.calls - (state.last?.calls ?? 0)))
            tokens.increment(by: max(0, statistics.tokens - (state.last?.tokens ?? 0)))
            rejected.increment(by: max(0, statistics.rejected - (state.last?.rejected ?? 0)))
            while state.expertCounters.count < statistics.tokensPerExpert.count {
                let e = state.expertCounters.count
                let name = e < state.expertNames.count ? state.expertNames[e] : "expert\(e)"
                state.expertCounters.append(Counter(label: "\(Self.prefix)_expert_tokens_total", dimensions: [("expert", name)], factory: factory))
            }
            for (e, count) in statistics.tokensPerExpert.enumerated() {
                let before = state.last.map { e < $0.tokensPerExpert.count ? $0.tokensPerExpert[e] : 0 } ?? 0
                if count > before { state.expertCounters[e].increment(by: count - before) }
            }
            if now > state.lastSample {
                busyWorkers.record(Double(busy &- state.lastBusy) / Double(now - state.lastSample))
            }
            state.last = statistics
            state.lastSample = now
            state.lastBusy = busy
        }
        queueDepth.record(depth)
    }
}
