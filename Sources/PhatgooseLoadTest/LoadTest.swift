import Dispatch
import Foundation
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseProfiling
import PhatgooseDistributed
import PhatgooseRuntime
import Synchronization

/// What a load test reports while it runs, once per progress interval.
public struct LoadTestProgress: Sendable {
    public enum Phase: String, Sendable { case warmup = "warm-up", measuring, draining }
    public var phase: Phase
    /// Seconds since the run started (warm-up included).
    public var elapsed: Double
    /// Seconds of measurement so far.
    public var measured: Double
    /// Measured requests completed so far.
    public var completed: Int
    public var rejected: Int
    public var failed: Int
    /// Requests completed per second, tokens per second and p99 latency (ms) over the last interval (all requests,
    /// warm-up included, so the line moves from the start).
    public var requestRate: Double
    public var tokenRate: Double
    public var p99Milliseconds: Double
    /// Requests in flight, and (open loop) arrivals due but not yet started.
    public var inFlight: Int
    public var backlog: Int
    public var residentBytes: Int
}

/// Which observers a load test installs in its runtime.
public struct LoadTestInstruments: Sendable {
    /// Phase accounting (worker utilisation, phase breakdown, executor waits): about 30 ns per runtime event.
    public var accounting: Bool
    /// A trace ring, switched on for the measured window only.
    public var tracer: TraceRecorder?
    /// swift-metrics, sampled once per progress interval.
    public var metrics: RuntimeMetrics?

    public init(accounting: Bool = true, tracer: TraceRecorder? = nil, metrics: RuntimeMetrics? = nil) {
        self.accounting = accounting
        self.tracer = tracer
        self.metrics = metrics
    }
}

/// A load test: a runtime serving a library, driven by client threads with the model-shaped requests of a
/// ``ModelWorkload``, in a closed or open loop (see ``LoadTestOptions``), measured after a warm-up.
///
/// The measured window starts `warmup` seconds after the clients and lasts `duration` seconds (or until `requests`
/// measured requests have completed). A request is *measured* when it started (closed loop) or was scheduled to
/// arrive (open loop) inside the window; latencies, rejections and failures count measured requests only, and the
/// run waits up to `drainTimeout` for measured requests still in flight at the window's end. Throughputs count
/// completions inside the window over its length. Routing tallies, phase sums and runtime counters cover the window.
///
/// Threads: the load test owns its client threads (they play the embedding application's callers: the runtime's own
/// threads stay the runtime's); `run` drives them from the calling thread, which also reports progress.
///
/// `run` may be called again once it has returned: each run makes its own clients and state and reports only its own
/// window (runtime counters and phase sums are taken as differences), so several measurements can share one runtime,
/// as a client sweep (``LoadTestSweep``) does.
///
/// # Thread safety
/// Immutable apart from what `run` creates for itself; one `run` at a time, from one thread.
public final class LoadTest: Sendable {
    /// The runtime in this process; nil when the test drives a distributed runtime.
    public let runtime: Runtime?
    /// What the clients call.
    public let target: any LoadTarget
    public let workload: ModelWorkload
    public let options: LoadTestOptions
    public let instruments: LoadTestInstruments
    private let accounting: PhaseAccounting?
    /// Where the library came from, for reports.
    public let libraryDescription: String

    /// A runtime for `library` with `runtimeOptions` (its observer is replaced by the instruments') and the workload.
    public init(library: ExpertLibrary, options: LoadTestOptions, runtimeOptions: RuntimeOptions,
                instruments: LoadTestInstruments = LoadTestInstruments(), libraryDescription: String? = nil) throws {
        try options.validate()
        self.options = options
        self.instruments = instruments
        var runtimeOptions = runtimeOptions
        // The same topology and worker count the runtime will use, so the accounting has a slot per participant.
        let topology = runtimeOptions.topology ?? Topology.detect()
        runtimeOptions.topology = topology
        let pool = (runtimeOptions.workers ?? max(0, topology.cpuCount - 1)) + 1
        // The pool's participants, then one more per lane after the first (each lane's holder reports as one).
        let participants = pool + max(0, (runtimeOptions.lanes ?? pool) - 1)
        let accounting = instruments.accounting ? PhaseAccounting(participants: participants, layers: library.modules.count) : nil
        self.accounting = accounting
        var observers: [any RuntimeObserver] = []
        if let accounting { observers.append(accounting) }
        if let tracer = instruments.tracer { observers.append(tracer) }
        if let metrics = instruments.metrics { observers.append(metrics) }
        runtimeOptions.observer = observers.isEmpty ? nil : observers.count == 1 ? observers[0] : ObserverFanout(observers)
        let runtime = try Runtime(library: library, options: runtimeOptions)
        self.runtime = runtime
        let target = try LocalTarget(runtime: runtime)
        self.target = target
        workload = try ModelWorkload(target: target, library: library, options: options)
        self.libraryDescription = libraryDescription ?? library.source.path
    }

    /// A load test of `library` served by `distributed` (on rank 0 of its MPI world; the caller shuts it down).
    /// Phase accounting and tracing observe a local runtime only: `instruments` contributes its metrics.
    public init(library: ExpertLibrary, distributed: DistributedRuntime, options: LoadTestOptions,
                instruments: LoadTestInstruments = LoadTestInstruments(), libraryDescription: String? = nil) throws {
        try options.validate()
        self.options = options
        self.instruments = LoadTestInstruments(accounting: false, tracer: nil, metrics: instruments.metrics)
        accounting = nil
        runtime = nil
        let target = DistributedTarget(runtime: distributed)
        self.target = target
        workload = try ModelWorkload(target: target, library: library, options: options)
        self.libraryDescription = libraryDescription ?? library.source.path
    }

    deinit { runtime?.shutdown() }

    /// Runs the test; `progress` hears from the calling thread once per progress interval.
    public func run(progress: ((LoadTestProgress) -> Void)? = nil) -> LoadTestResult {
        run(options, progress: progress)
    }

    /// Runs the test with `loop` instead of the options' loop (the rest of the options as given); the result's
    /// options carry `loop`. Throws `LoadTestError(.option)` when `loop` is out of range.
    public func run(loop: LoadTestOptions.Loop, progress: ((LoadTestProgress) -> Void)? = nil) throws -> LoadTestResult {
        var options = self.options
        options.loop = loop
        try options.validate()
        return run(options, progress: progress)
    }

    private func run(_ options: LoadTestOptions, progress: ((LoadTestProgress) -> Void)?) -> LoadTestResult {
        let nanos = { (seconds: Double) in UInt64((seconds * 1e9).rounded()) }
        let t0 = MonotonicClock.now()
        let windowStart = t0 + nanos(options.warmup)
        let plannedEnd = options.duration.map { windowStart + nanos($0) }
        var schedule: ArrivalSchedule? = nil
        if case let .open(rate, burstiness, _) = options.loop {
            schedule = ArrivalSchedule(process: ArrivalProcess(rate: rate, burstiness: burstiness, seed: options.seed), start: t0)
        }
        let state = RunState(windowStart: windowStart, windowEnd: plannedEnd ?? .max, requestTarget: options.requests, schedule: schedule,
                             layers: workload.layerCount, experts: workload.library.experts.count)
        // The seeded schedule as it starts: replayed at the end, it tells how many arrivals fell in the window,
        // independently of which of them the clients took.
        let initialSchedule = schedule

        // Clients.
        let group = DispatchGroup()
        let workload = self.workload, target = self.target, open = schedule != nil
        for i in 0..<options.clientThreads {
            group.enter()
            let thread = Thread {
                TemporaryFiles.blockInterruptionsInThisThread()
                let runner = RequestRunner(workload: workload, target: target)
                if open { LoadTest.openClient(runner, state) } else { LoadTest.closedClient(runner, state) }
                // Idle until the run stops, so client memory stays put until the end (the RSS figures compare like
                // with like) rather than leaving with whichever clients ran out of arrivals first.
                while !state.stopped.load(ordering: .acquiring) { MonotonicClock.sleep(until: MonotonicClock.now() + 20_000_000) }
                state.tallies.withLock { $0.merge(runner.tally) }
                group.leave()
            }
            thread.name = "pg-load-client-\(i)"
            thread.stackSize = 1 << 20
            thread.start()
        }

        // Coordinator: window edges, progress, metrics, memory.
        var atStart: (stats: RuntimeStatistics, phases: PhaseTotals?)? = nil
        var rssStart = 0, rssMax = ProcessMemory.residentBytes()
        var timeline: [LoadTestResult.TimelinePoint] = []
        var maxBacklog = 0
        let interval = nanos(options.progressInterval)
        var nextTick = t0 + interval
        var lastTick = t0
        var windowEnd = UInt64.max
        func report(_ phase: LoadTestProgress.Phase, now: UInt64) {
            let (tick, totals) = state.stats.withLock { stats -> (RequestStatistics.Interval, (Int, Int, Int)) in
                let tick = stats.interval
                stats.interval = RequestStatistics.Interval()
                return (tick, (stats.completed, stats.rejected, stats.failed))
            }
            let seconds = Double(now - lastTick) / 1e9
            lastTick = now
            let rss = ProcessMemory.residentBytes()
            rssMax = max(rssMax, rss)
            let backlog = state.backlog(at: now)
            maxBacklog = max(maxBacklog, backlog)
            let snapshot = LoadTestProgress(
                phase: phase, elapsed: Double(now - t0) / 1e9, measured: now > windowStart ? Double(min(now, windowEnd) - windowStart) / 1e9 : 0,
                completed: totals.0, rejected: totals.1, failed: totals.2,
                requestRate: seconds > 0 ? Double(tick.completions) / seconds : 0, tokenRate: seconds > 0 ? Double(tick.tokens) / seconds : 0,
                p99Milliseconds: tick.latency.milliseconds(atPercentile: 99), inFlight: state.inFlight.load(ordering: .relaxed),
                backlog: backlog, residentBytes: rss)
            if phase == .measuring {
                timeline.append(LoadTestResult.TimelinePoint(seconds: snapshot.measured, completed: snapshot.completed, requestRate: snapshot.requestRate,
                                                             tokenRate: snapshot.tokenRate, p99Milliseconds: snapshot.p99Milliseconds,
                                                             inFlight: snapshot.inFlight, backlog: backlog, residentBytes: rss))
            }
            instruments.metrics?.sample(target.statisticsSnapshot(), queueDepth: max(0, state.inRuntime.load(ordering: .relaxed) - 1))
            progress?(snapshot)
        }
        while true {
            var now = MonotonicClock.now()
            var wake = min(nextTick, now + 50_000_000)
            if atStart == nil { wake = min(wake, windowStart) }
            if let plannedEnd { wake = min(wake, plannedEnd) }
            if wake > now { MonotonicClock.sleep(until: wake) }
            now = MonotonicClock.now()
            if atStart == nil && now >= windowStart {
                atStart = (target.statisticsSnapshot(), accounting?.snapshot())
                instruments.tracer?.setRecording(true)
                rssStart = ProcessMemory.residentBytes()
            }
            // A target that serves no more calls (a distributed runtime whose rank died or hangs) ends the run now.
            // (during the warm-up: at the window's start, so the window is empty rather than negative).
            if target.failure != nil, max(now, windowStart) < state.windowEnd.load(ordering: .acquiring) {
                state.windowEnd.store(max(now, windowStart), ordering: .releasing)
            }
            let end = state.windowEnd.load(ordering: .acquiring)
            if atStart != nil && now >= end {
                windowEnd = end
                break
            }
            if now >= nextTick {
                report(atStart == nil ? .warmup : .measuring, now: now)
                nextTick += interval * max(1, (now - nextTick) / interval + 1)
            }
        }
        let atEnd = (stats: target.statisticsSnapshot(), phases: accounting?.snapshot())
        instruments.tracer?.setRecording(false)
        let rssEnd = ProcessMemory.residentBytes()
        rssMax = max(rssMax, rssEnd)
        report(.measuring, now: max(MonotonicClock.now(), windowEnd))
        nextTick = MonotonicClock.now() + interval

        // Drain measured requests still in flight, and (open loop) arrivals of the window no client has taken yet,
        // then stop everyone.
        let drainDeadline = windowEnd + nanos(options.drainTimeout)
        while state.measuredPending(before: windowEnd) && MonotonicClock.now() < drainDeadline {
            MonotonicClock.sleep(until: min(drainDeadline, MonotonicClock.now() + 20_000_000))
            let now = MonotonicClock.now()
            if now >= nextTick {
                report(.draining, now: now)
                nextTick += interval * max(1, (now - nextTick) / interval + 1)
            }
        }
        state.stopped.store(true, ordering: .sequentiallyConsistent)
        group.wait()
        instruments.metrics?.sample(target.statisticsSnapshot(), queueDepth: 0)
        // Arrivals of the window that no client took before the drain ended are unfinished too: they arrived.
        var arrivals: Int? = nil
        if let initialSchedule {
            let left = state.schedule!.withLock { $0.count(from: windowStart, before: windowEnd) }
            state.stats.withLock { $0.unfinished += left }
            arrivals = initialSchedule.count(from: windowStart, before: windowEnd)
        }

        let start = atStart!
        var runtimeStats = atEnd.stats
        runtimeStats.calls -= start.stats.calls
        runtimeStats.tokens -= start.stats.tokens
        runtimeStats.rejected -= start.stats.rejected
        runtimeStats.dispatches -= start.stats.dispatches
        runtimeStats.mergedCalls -= start.stats.mergedCalls
        runtimeStats.concurrentDispatches -= start.stats.concurrentDispatches
        for e in runtimeStats.tokensPerExpert.indices where e < start.stats.tokensPerExpert.count {
            runtimeStats.tokensPerExpert[e] -= start.stats.tokensPerExpert[e]
        }
        let phases = atEnd.phases.flatMap { end in start.phases.map { end.subtracting($0) } }
        let stats = state.stats.withLock { $0 }
        return LoadTestResult(
            libraryDescription: libraryDescription, layerNames: workload.library.modules.map(\.name),
            expertNames: workload.library.experts.map(\.name),
            candidates: workload.layers.map { layer in layer.candidateRow.indices.filter { layer.candidateRow[$0] >= 0 } },
            options: options, participantNodes: target.participantNodes, participantCPUs: target.participantCPUs,
            executor: target.executorName, maxQueuedCalls: target.maxQueuedCalls, topK: target.routing.topK,
            router: target.routing.router.rawValue, windowSeconds: Double(windowEnd - windowStart) / 1e9, statistics: stats,
            runtimeStatistics: runtimeStats, phases: phases, tally: state.tallies.withLock { $0 },
            residentBytesStart: rssStart, residentBytesEnd: rssEnd, residentBytesMax: rssMax, timeline: timeline, maxBacklog: maxBacklog,
            routing: target.routing, runtimeOptions: target.runtimeOptions, topology: target.topology, ranks: target.ranks,
            arrivals: arrivals)
    }

    // MARK: Clients

    /// Closed loop: the next request as soon as the previous one finished, until the window ends.
    static func closedClient(_ runner: RequestRunner, _ state: RunState) {
        while !state.stopped.load(ordering: .relaxed) {
            // Counted in flight before the clock is read: a drain that has seen none in flight then sees this
            // request start at or after the window's end, unmeasured (it never waits for a request it missed).
            state.measuredInFlight.add(1, ordering: .sequentiallyConsistent)
            let start = MonotonicClock.now()
            guard start < state.windowEnd.load(ordering: .sequentiallyConsistent) else {
                state.measuredInFlight.subtract(1, ordering: .sequentiallyConsistent)
                break
            }
            let measured = start >= state.windowStart
            if !measured { state.measuredInFlight.subtract(1, ordering: .sequentiallyConsistent) }
            let index = state.nextIndex.add(1, ordering: .relaxed).oldValue
            serve(runner, state, runner.workload.request(index), scheduled: start, start: start, measured: measured)
        }
    }

    /// Open loop: take the next arrival, wait for its time, serve it; arrivals after the window are not served.
    static func openClient(_ runner: RequestRunner, _ state: RunState) {
        while !state.stopped.load(ordering: .relaxed) {
            // An arrival of the window is counted in flight as it is taken, under the schedule's lock, so the drain
            // (which looks under the same lock) sees it either not yet taken or in flight.
            let (index, scheduled, counted) = state.schedule!.withLock { schedule -> (Int, UInt64, Bool) in
                let (index, scheduled) = schedule.take()
                let counted = scheduled >= state.windowStart && scheduled < state.windowEnd.load(ordering: .sequentiallyConsistent)
                if counted { state.measuredInFlight.add(1, ordering: .sequentiallyConsistent) }
                return (index, scheduled, counted)
            }
            var now = MonotonicClock.now()
            var stopped = false
            while now < scheduled {
                if state.stopped.load(ordering: .relaxed) || scheduled >= state.windowEnd.load(ordering: .acquiring) { stopped = true; break }
                MonotonicClock.sleep(until: min(scheduled, now + 50_000_000))
                now = MonotonicClock.now()
            }
            // The window may have ended early since (a request target met, a target that failed): an arrival after
            // its new end is not measured.
            let measured = counted && scheduled < state.windowEnd.load(ordering: .acquiring)
            if counted && (stopped || !measured) {
                if measured { state.stats.withLock { $0.unfinished += 1 } }
                state.measuredInFlight.subtract(1, ordering: .releasing)
            }
            if stopped || scheduled >= state.windowEnd.load(ordering: .acquiring) { return }
            state.started.add(1, ordering: .relaxed)
            serve(runner, state, runner.workload.request(index), scheduled: scheduled, start: now, measured: measured)
        }
    }

    /// Serves one request; a measured one is already counted in flight.
    static func serve(_ runner: RequestRunner, _ state: RunState, _ request: RequestSpec, scheduled: UInt64, start: UInt64, measured: Bool) {
        state.inFlight.add(1, ordering: .relaxed)
        let windowStart = state.windowStart
        let outcome = runner.run(request, tallying: {
            let now = MonotonicClock.now()
            return now >= windowStart && now < state.windowEnd.load(ordering: .relaxed)
        }, abort: { state.stopped.load(ordering: .relaxed) }, inRuntime: state.inRuntime)
        let end = MonotonicClock.now()
        state.inFlight.subtract(1, ordering: .relaxed)
        state.record(request, scheduled: scheduled, start: start, end: end, outcome: outcome, measured: measured)
        if measured { state.measuredInFlight.subtract(1, ordering: .releasing) }
    }
}

/// The open loop's arrival times, drawn on demand by whichever client is free.
struct ArrivalSchedule: Sendable {
    var process: ArrivalProcess
    var next: UInt64
    var index = 0

    init(process: ArrivalProcess, start: UInt64) {
        self.process = process
        next = start
        next += UInt64(self.process.nextGap() * 1e9)
    }

    /// The next arrival: its request index and time.
    mutating func take() -> (Int, UInt64) {
        defer {
            index += 1
            next += UInt64(process.nextGap() * 1e9)
        }
        return (index, next)
    }

    /// Arrivals not yet taken that are scheduled at or after `start` and before `end` (at most `limit`).
    func count(from start: UInt64 = 0, before end: UInt64, limit: Int = .max) -> Int {
        var copy = self
        var count = 0
        while copy.next < end && count < limit {
            if copy.next >= start { count += 1 }
            copy.next += UInt64(copy.process.nextGap() * 1e9)
        }
        return count
    }
}

/// Request outcomes of a run so far.
struct RequestStatistics: Sendable {
    /// What the progress line shows: every completion since the last report.
    struct Interval: Sendable {
        var completions = 0
        var tokens = 0
        var latency = LatencyHistogram()
    }

    var e2el = LatencyHistogram()
    var queue = LatencyHistogram()
    var service = LatencyHistogram()
    var decode = LatencyHistogram()
    var prefill = LatencyHistogram()
    var interval = Interval()
    /// Measured requests by outcome.
    var completed = 0
    var completedDecode = 0
    var completedPrefill = 0
    var rejected = 0
    var failed = 0
    var unfinished = 0
    /// Tokens of completed measured requests.
    var measuredTokens = 0
    /// Completions (of any request) inside the window, and their tokens: the throughput figures.
    var windowCompletions = 0
    var windowTokens = 0
    var firstFailure: String?
}

/// State shared by the clients and the coordinator.
///
/// # Thread safety
/// Atomics, and `Locked` (pthread)es held for a few field updates (once per request, or once per report).
final class RunState: Sendable {
    let windowStart: UInt64
    /// The window's end: fixed with a duration; set by the client completing the last measured request otherwise.
    let windowEnd: Atomic<UInt64>
    let requestTarget: Int?
    let stopped = Atomic<Bool>(false)
    let nextIndex = Atomic<Int>(0)
    let inRuntime = Atomic<Int>(0)
    let inFlight = Atomic<Int>(0)
    let measuredInFlight = Atomic<Int>(0)
    let started = Atomic<Int>(0)
    let schedule: Locked<ArrivalSchedule>?
    let stats = Locked(RequestStatistics())
    let tallies: Locked<RoutingTally>

    init(windowStart: UInt64, windowEnd: UInt64, requestTarget: Int?, schedule: ArrivalSchedule?, layers: Int, experts: Int) {
        self.windowStart = windowStart
        self.windowEnd = Atomic(windowEnd)
        self.requestTarget = requestTarget
        self.schedule = schedule.map { Locked($0) }
        tallies = Locked(RoutingTally(layers: layers, experts: experts))
    }

    /// Arrivals due by `now` that no client has taken yet (at most a million).
    func backlog(at now: UInt64) -> Int { schedule?.withLock { $0.count(before: now + 1, limit: 1_000_000) } ?? 0 }

    /// Measured requests are in flight, or (open loop) an arrival before `end` is not yet taken. Looked at under the
    /// schedule's lock, under which a client takes an arrival and counts it in flight.
    func measuredPending(before end: UInt64) -> Bool {
        guard let schedule else { return measuredInFlight.load(ordering: .sequentiallyConsistent) > 0 }
        return schedule.withLock { $0.next < end || measuredInFlight.load(ordering: .sequentiallyConsistent) > 0 }
    }

    func record(_ request: RequestSpec, scheduled: UInt64, start: UInt64, end: UInt64, outcome: RequestRunner.Outcome, measured: Bool) {
        stats.withLock { stats in
            switch outcome {
            case .completed:
                let windowEnd = self.windowEnd.load(ordering: .acquiring)
                if end >= windowStart && end <= windowEnd {
                    stats.windowCompletions += 1
                    stats.windowTokens += request.tokens
                }
                stats.interval.completions += 1
                stats.interval.tokens += request.tokens
                stats.interval.latency.record(nanoseconds: end - scheduled)
                guard measured else { return }
                stats.completed += 1
                stats.measuredTokens += request.tokens
                stats.e2el.record(nanoseconds: end - scheduled)
                stats.queue.record(nanoseconds: start - scheduled)
                stats.service.record(nanoseconds: end - start)
                if request.kind == .decode {
                    stats.completedDecode += 1
                    stats.decode.record(nanoseconds: end - scheduled)
                } else {
                    stats.completedPrefill += 1
                    stats.prefill.record(nanoseconds: end - scheduled)
                }
                if let target = requestTarget, stats.completed >= target, windowEnd == .max {
                    self.windowEnd.store(end, ordering: .releasing)
                }
            case .rejected:
                if measured { stats.rejected += 1 }
            case let .failed(message):
                if measured { stats.failed += 1 }
                if stats.firstFailure == nil { stats.firstFailure = message }
            case .aborted:
                if measured { stats.unfinished += 1 }
            }
        }
    }
}
