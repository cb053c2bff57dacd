import ArgumentParser
import Foundation
import PhatgooseFormats
import PhatgooseLoadTest
import PhatgooseProfiling
import PhatgooseRuntime

struct ProfileCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "profile",
        abstract: "Run a load test with tracing on and write a Chrome trace, an HTML report, per (layer, expert) counts and a summary.",
        discussion: """
            Writes into --out: trace.json (Chrome trace-event JSON: open it in ui.perfetto.dev or chrome://tracing), \
            report.html (self-contained, inline SVG), expert_counts.csv and summary.json (the load test's JSON plus trace \
            figures). The trace ring holds --trace-events events; older ones are dropped and counted. \
            --compare A B shows what changed between two runs (summary.json files or profile directories); \
            --overhead measures what observing the runtime costs.
            """
    )

    @OptionGroup var load: LoadTestFlags

    @Option(help: "Directory to write the trace, report, CSV and summary into (created if missing).")
    var out: String = "phatgoose-profile"

    @Option(parsing: .unconditional, help: "Trace ring capacity in events (40 bytes each); beyond it the oldest events are dropped and counted.")
    var traceEvents: Int = 262_144

    @Option(parsing: .upToNextOption, help: "Instead of a run: compare two runs, given as summary.json files or profile directories (A then B).")
    var compare: [String] = []

    @Flag(help: "Instead of a run: measure what observing costs, alternating no observer, phase accounting and tracing on the same closed-loop workload (--duration per run, default 5 s).")
    var overhead = false

    @Option(help: "Output format: text or json.")
    var format: OutputFormat = .text

    func validate() throws {
        if load.isSweep {
            throw ValidationError("--clients: expected one client count (a sweep of several is `phatgoose loadtest`'s), found \(load.clients ?? "")")
        }
        if !compare.isEmpty && compare.count != 2 { throw ValidationError("--compare: expected two runs (A B), found \(compare.count)") }
        guard traceEvents >= 1 && traceEvents <= 100_000_000 else { throw ValidationError("--trace-events: expected 1 to 100000000, found \(traceEvents)") }
    }

    func run() throws {
        if compare.count == 2 { return try runCompare() }
        if overhead { return try runOverhead() }
        // Every file the profile writes, and the directory itself, must leave the library alone.
        for file in ["", "/summary.json", "/trace.json", "/expert_counts.csv", "/report.html"] {
            try OutputPath.refuseOverwriting(out + file, option: "--out", inputs: load.inputs)
        }
        let printer = load.printer()
        let tracer = TraceRecorder(capacity: traceEvents)
        let (test, export, server, generated) = try load.makeTest(printer, instruments: LoadTestInstruments(tracer: tracer))
        defer { server?.stop() }
        do {
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        } catch {
            throw ProfilingError(.io, file: out, "expected a directory to write the profile into, found: \(error.localizedDescription)")
        }
        var result = try load.run(test, printer: printer, export: export)
        result.generatedLibrarySeconds = generated
        let records = tracer.records()
        let dropped = tracer.dropped

        // summary.json: the load test's JSON plus the trace's figures.
        guard case var .object(fields) = result.json() else { fatalError("a load test result is an object") }
        fields = fields.map { $0.key == "tool" ? (key: "tool", value: .string("phatgoose profile")) : $0 }
        fields += [("trace_ring_capacity", .integer(traceEvents)), ("recorded_trace_events", .integer(records.count)),
                   ("dropped_trace_events", .integer(dropped))]
        let summary = JSONValue.object(fields)
        try emit(summary.serialized() + "\n", to: out + "/summary.json")

        let context = ChromeTrace.Context(
            layerNames: result.layerNames, expertNames: result.expertNames, participantNodes: result.participantNodes,
            participantCPUs: result.participantCPUs, dropped: dropped,
            metadata: [("library", result.libraryDescription), ("tool", "phatgoose profile")])
        try ChromeTrace.write(records, context: context, to: out + "/trace.json")
        try ExpertCountsCSV.write(result.tally, layerNames: result.layerNames, expertNames: result.expertNames, candidates: result.candidates,
                                  to: out + "/expert_counts.csv")
        let report = HTMLReport(
            title: "Phatgoose profile: \(result.libraryDescription)", facts: facts(result, records: records.count, dropped: dropped),
            layerNames: result.layerNames, expertNames: result.expertNames, candidates: result.candidates, tally: result.tally,
            latency: result.e2el, phases: result.phases ?? PhatgooseProfiling.PhaseTotals(participants: 0, layers: 0),
            wallNanoseconds: UInt64(result.windowSeconds * 1e9), participantNodes: result.participantNodes,
            participantCPUs: result.participantCPUs, trace: records, droppedEvents: dropped)
        try emit(report.render(), to: out + "/report.html")

        switch format {
        case .json: print(summary.serialized())
        case .text:
            print(result.text(), terminator: "")
            print("trace: \(records.count) events recorded" + (dropped > 0 ? ", \(dropped) older events dropped (ring of \(traceEvents))" : ", none dropped"))
            for file in ["report.html", "trace.json", "expert_counts.csv", "summary.json"] { print("wrote \(out)/\(file)") }
        }
    }

    func facts(_ r: LoadTestResult, records: Int, dropped: Int) -> [(String, String)] {
        func f(_ v: Double) -> String { String(format: "%.2f", v) }
        var facts: [(String, String)] = []
        switch r.options.loop {
        case let .closed(clients): facts.append(("load", "closed loop, \(clients) clients"))
        case let .open(rate, burstiness, maxConcurrency): facts.append(("load", "open loop, \(f(rate)) req/s, burstiness \(f(burstiness)), at most \(maxConcurrency) in flight"))
        }
        facts += [
            ("routing", "\(r.router), top-\(r.topK), \(r.layerNames.count) routed layers, \(r.expertNames.count) experts"),
            ("runtime", "\(r.participantNodes.count - 1) worker\(r.participantNodes.count == 2 ? "" : "s") + caller, \(r.executor) executor, at most \(r.maxQueuedCalls) calls queued"),
            ("measured", "\(f(r.windowSeconds)) s after \(f(r.options.warmup)) s of warm-up"),
            ("requests", "\(r.completed) completed, \(r.rejected) rejected, \(r.failed) failed"),
            ("throughput", "\(f(r.requestThroughput)) req/s, \(f(r.tokenThroughput)) tok/s"),
            ("latency", "mean \(f(r.e2el.meanMilliseconds)) ms, median \(f(r.e2el.medianMilliseconds)) ms, p99 \(f(r.e2el.milliseconds(atPercentile: 99))) ms, p99.9 \(f(r.e2el.milliseconds(atPercentile: 99.9))) ms"),
            ("expert load", "max/mean \(f(r.expertImbalance.maxOverMean)), (max-mean)/mean \(f(r.expertImbalance.excessOverMean))"),
            ("trace", "\(records) events" + (dropped > 0 ? ", \(dropped) dropped" : ", none dropped")),
        ]
        if let utilisation = r.workerUtilisation {
            facts.append(("worker utilisation", utilisation.enumerated().map { ($0.offset == 0 ? "caller" : "worker \($0.offset)") + " \(Int(($0.element * 100).rounded()))%" }.joined(separator: ", ")))
            if let lanes = r.laneUtilisation {
                facts.append(("lane utilisation", lanes.enumerated().map { "lane \($0.offset + 1) \(Int(($0.element * 100).rounded()))%" }.joined(separator: ", ")))
            }
        }
        return facts
    }

    func runCompare() throws {
        let a = try RunComparison.load(compare[0]), b = try RunComparison.load(compare[1])
        let comparison = RunComparison(a: a, b: b, pathA: compare[0], pathB: compare[1])
        switch format {
        case .json: print(comparison.json().serialized())
        case .text: print(comparison.text(), terminator: "")
        }
    }

    /// Alternates the three observation levels over rounds of the same closed-loop workload; reports the median token
    /// throughput of each and the cost per event of the tracing ring and the accounting, timed alone.
    func runOverhead() throws {
        var options = try load.options()
        if load.duration == nil && load.requests == nil { options.duration = 5 }
        options.warmup = min(options.warmup, 1)
        let printer = load.printer()
        let (library, description, _) = try load.loadLibrary(printer)
        var runtimeOptions = try load.runtimeFlags.options(routing: load.routing, defaults: library.routing)
        runtimeOptions.maxQueuedCalls = load.maxQueuedCalls
        let levels: [(String, () -> LoadTestInstruments)] = [
            ("none", { LoadTestInstruments(accounting: false) }),
            ("accounting", { LoadTestInstruments(accounting: true) }),
            ("tracing", { LoadTestInstruments(accounting: true, tracer: TraceRecorder(capacity: traceEvents)) }),
        ]
        var throughput: [String: [Double]] = [:]
        for round in 1...3 {
            for (name, make) in levels {
                let test = try LoadTest(library: library, options: options, runtimeOptions: runtimeOptions, instruments: make(), libraryDescription: description)
                let result = test.run()
                test.runtime?.shutdown()
                throughput[name, default: []].append(result.tokenThroughput)
                printer?.message("overhead: round \(round), \(name): \(String(format: "%.1f", result.tokenThroughput)) tok/s")
            }
        }
        let median = { (values: [Double]) in values.sorted()[values.count / 2] }
        let base = median(throughput["none"]!)
        let perEvent = Self.perEventCost(capacity: traceEvents)
        switch format {
        case .json:
            print(JSONValue.object([
                ("library", .string(description)), ("duration", .double(options.duration ?? 0)),
                ("levels", .array(levels.map { name, _ in
                    let m = median(throughput[name]!)
                    return .object([("observation", .string(name)), ("median_token_throughput", .double(m)),
                                    ("relative_to_none", .double(base > 0 ? m / base : 0)),
                                    ("runs", .array(throughput[name]!.map { .double($0) }))])
                })),
                ("trace_ns_per_event", .double(perEvent.trace)), ("accounting_ns_per_event", .double(perEvent.accounting)),
            ]).serialized())
        case .text:
            print("observation   median tok/s   vs none   (3 rounds of \(options.duration.map { "\($0) s" } ?? "\(options.requests!) requests"), alternating)")
            for (name, _) in levels {
                let m = median(throughput[name]!)
                print(name.padding(toLength: 12, withPad: " ", startingAt: 0) + String(format: "  %12.1f   %+6.1f%%", m, base > 0 ? 100 * (m / base - 1) : 0))
            }
            print(String(format: "cost per event, one thread: tracing ring %.1f ns, phase accounting %.1f ns", perEvent.trace, perEvent.accounting))
        }
    }

    /// Nanoseconds per `observe` of the trace ring and the accounting, one thread, 2 million events each.
    static func perEventCost(capacity: Int) -> (trace: Double, accounting: Double) {
        let tracer = TraceRecorder(capacity: capacity)
        tracer.setRecording(true)
        let accounting = PhaseAccounting(participants: 2, layers: 8)
        let count = 2_000_000
        func time(_ observer: any RuntimeObserver) -> Double {
            let start = MonotonicClock.now()
            for i in 0..<count {
                observer.observe(RuntimeEvent(kind: .item, worker: i & 1, node: 0, layer: i & 7, expert: Int32(i & 15), rows: 16,
                                              start: UInt64(i), end: UInt64(i + 100)))
            }
            return Double(MonotonicClock.now() - start) / Double(count)
        }
        return (time(tracer), time(accounting))
    }
}
