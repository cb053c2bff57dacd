import ArgumentParser
import Foundation
import PhatgooseDistributed
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseLoadTest
import PhatgooseProfiling
import PhatgooseRuntime

/// Where progress goes.
enum ProgressMode: String, ExpressibleByArgument, CaseIterable {
    case auto, line, plain, none
}

/// The load test's options, shared by `loadtest` and `profile`.
struct LoadTestFlags: ParsableArguments {
    @Option(help: "A library directory or packed library (default: the built-in synthetic T5-base library, generated on first use and cached in $PHATGOOSE_CACHE or ~/.cache/phatgoose).")
    var library: String?

    @Option(parsing: .unconditional, help: "Closed loop: concurrent clients, each sending its next request when its previous one finishes (default 4). A comma-separated list (1,2,4,8,16) runs a sweep on one runtime: every count in every round (--rounds), reported side by side.")
    var clients: String?

    @Option(parsing: .unconditional, help: "Open loop: requests per second, arriving whether or not earlier ones have finished (instead of --clients).")
    var rate: Double?

    @Option(parsing: .unconditional, help: "Open loop: shape of the gamma-distributed gaps between arrivals; 1 is Poisson, below 1 burstier, above 1 more regular.")
    var burstiness: Double?

    @Option(parsing: .unconditional, help: "Open loop: most requests in flight; later arrivals wait for a free client, which is their queueing time (default: 8 per dispatch lane, at most --max-queued-calls: 16 with 2 CPUs; more requests in flight serve fewer per second, and above --max-queued-calls load is shed as rejections).")
    var maxConcurrency: Int?

    @Option(parsing: .unconditional, help: "Seconds of measurement after the warm-up (default 20; not with --requests).")
    var duration: Double?

    @Option(parsing: .unconditional, help: "Measure until this many requests have completed (instead of --duration).")
    var requests: Int?

    @Option(parsing: .unconditional, help: "Seconds of warm-up, excluded from every figure.")
    var warmup: Double = 3

    @Option(parsing: .unconditional, help: "Most seconds to wait after the window for measured requests still in flight; the rest count as unfinished.")
    var drainTimeout: Double = 10

    @Option(parsing: .unconditional, help: "Share of decode-like requests; the rest are prefill-like.")
    var decodeFraction: Double = 0.8

    @Option(help: "Tokens of a decode-like request: N or MIN-MAX.")
    var decodeTokens: String = "1-16"

    @Option(help: "Tokens of a prefill-like request: N or MIN-MAX.")
    var prefillTokens: String = "128-512"

    @Option(parsing: .unconditional, help: "How strongly a request's tokens lean towards its profile expert's gate (0: no task structure).")
    var affinity: Double = 0.35

    @Option(parsing: .unconditional, help: "Zipf exponent of how often each expert is a request's profile expert (0: uniform).")
    var skew: Double = 1

    @Option(parsing: .unconditional, help: "Seed of the request stream and arrival times.")
    var seed: UInt64 = 0

    @Option(parsing: .unconditional, help: "Most layer calls admitted by the runtime at once (running plus waiting); beyond it a call is refused at once and its request counts as rejected.")
    var maxQueuedCalls: Int = 64

    @OptionGroup var runtimeFlags: RuntimeFlags
    @OptionGroup var routing: RoutingFlags

    @Option(help: "Progress on standard error: auto (a live line on a terminal, a plain line every 5 s otherwise), line, plain or none.")
    var progress: ProgressMode = .auto

    @Option(parsing: .unconditional, help: "Seconds between progress reports and metric samples.")
    var progressInterval: Double = 1

    @Option(help: "Write the runtime's metrics in Prometheus text format to this file (rewritten atomically every progress interval).")
    var metricsFile: String?

    @Option(parsing: .unconditional, help: "Serve the runtime's metrics in Prometheus text format at http://127.0.0.1:PORT/metrics while the test runs.")
    var metricsPort: Int?

    /// The client counts `--clients` gives (4 without it).
    func clientCounts() throws -> [Int] {
        guard let clients else { return [4] }
        do { return try ClientCounts.parse(clients) } catch let error as LoadTestError { throw ValidationError(error.message) }
    }

    /// Whether `--clients` lists several counts: a sweep.
    var isSweep: Bool { ((try? clientCounts())?.count ?? 0) > 1 }

    func validate() throws {
        let counts = try clientCounts()
        if counts.count > 1, let rate {
            throw ValidationError("--clients \(clients!) with --rate \(rate): a sweep measures closed loops only; expected a client list without --rate, or --rate without --clients, found both")
        }
        if clients != nil && rate != nil { throw ValidationError("--clients and --rate: expected one (closed or open loop), found both") }
        if rate == nil && (burstiness != nil || maxConcurrency != nil) { throw ValidationError("--burstiness and --max-concurrency: only with --rate (open loop)") }
        if duration != nil && requests != nil { throw ValidationError("--duration and --requests: expected one, found both") }
        if let port = metricsPort, !(0...65_535).contains(port) { throw ValidationError("--metrics-port: expected 0 to 65535, found \(port)") }
        guard maxQueuedCalls >= 1 else { throw ValidationError("--max-queued-calls: expected at least 1, found \(maxQueuedCalls)") }
        _ = try tokenRange(decodeTokens, "--decode-tokens")
        _ = try tokenRange(prefillTokens, "--prefill-tokens")
        do { try options().validate() } catch let error as LoadTestError { throw ValidationError(error.message) }
    }

    func tokenRange(_ text: String, _ flag: String) throws -> ClosedRange<Int> {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false).map { Int($0) }
        if parts.count == 1, let n = parts[0], n >= 1 { return n...n }
        if parts.count == 2, let a = parts[0], let b = parts[1], a >= 1, b >= a { return a...b }
        throw ValidationError("\(flag): expected N or MIN-MAX with 1 <= MIN <= MAX, found \(text)")
    }

    /// Requests in flight per dispatch lane by default in the open loop: on the development machine the closed loop
    /// served 1.25x one client's tokens at 8 clients per lane and less beyond, and an open loop at 90% of one
    /// client's rate kept a bounded p99 with 16 in flight (2 lanes) but not with 64 (docs/loadtest.md).
    static let requestsPerLane = 8

    /// The open loop's default concurrency: `requestsPerLane` per lane of the runtime the flags describe, at most the
    /// admission bound (so no layer call is refused midway).
    var defaultMaxConcurrency: Int {
        let cpus = ((try? runtimeFlags.topology.map { try Topology.modelled($0) }) ?? nil)?.cpuCount ?? Topology.detect().cpuCount
        let lanes = runtimeFlags.lanes ?? ((runtimeFlags.workers ?? max(0, cpus - 1)) + 1)
        return max(1, min(maxQueuedCalls, Self.requestsPerLane * lanes))
    }

    func options() throws -> LoadTestOptions {
        let clients = try clientCounts()[0]
        let loop: LoadTestOptions.Loop = rate.map { .open(rate: $0, burstiness: burstiness ?? 1, maxConcurrency: maxConcurrency ?? defaultMaxConcurrency) }
            ?? .closed(clients: clients)
        return LoadTestOptions(loop: loop, duration: requests == nil ? (duration ?? 20) : nil, requests: requests, warmup: warmup,
                               drainTimeout: drainTimeout, decodeFraction: decodeFraction, decodeTokens: try tokenRange(decodeTokens, "--decode-tokens"),
                               prefillTokens: try tokenRange(prefillTokens, "--prefill-tokens"), affinity: affinity, skew: skew, seed: seed,
                               progressInterval: progressInterval)
    }

    func printer() -> ProgressPrinter? {
        switch progress {
        case .none: return nil
        case .auto: return ProgressPrinter()
        case .line: return ProgressPrinter(isTerminal: true)
        case .plain: return ProgressPrinter(isTerminal: false)
        }
    }

    /// The library to drive: the one given, or the built-in default (generated now if missing).
    func loadLibrary(_ printer: ProgressPrinter?) throws -> (library: ExpertLibrary, description: String, generatedSeconds: Double?) {
        if let library { return (try ExpertLibrary.load(path: library), library, nil) }
        let (path, seconds) = try DefaultLibrary.ensure { printer?.message("loadtest: " + $0) }
        if let seconds { printer?.message("loadtest: generated in \(String(format: "%.1f", seconds)) s") }
        return (try ExpertLibrary.load(path: path), DefaultLibrary.description, seconds)
    }

    /// A load test with `instruments` (metrics added when asked for), and the metrics export if any.
    /// What the test reads: the library given, or the built-in one's cached file.
    var inputs: [String] { [library ?? DefaultLibrary.cacheDirectory() + "/" + DefaultLibrary.fileName] }

    func makeTest(_ printer: ProgressPrinter?, instruments: LoadTestInstruments) throws -> (LoadTest, PrometheusExport?, MetricsServer?, Double?) {
        if let metricsFile { try OutputPath.refuseOverwriting(metricsFile, option: "--metrics-file", inputs: inputs) }
        let (library, description, generated) = try loadLibrary(printer)
        var runtimeOptions = try runtimeFlags.options(routing: routing, defaults: library.routing)
        runtimeOptions.maxQueuedCalls = maxQueuedCalls
        var instruments = instruments
        var export: PrometheusExport? = nil
        var server: MetricsServer? = nil
        if metricsFile != nil || metricsPort != nil {
            let prometheus = PrometheusExport()
            export = prometheus
            instruments.metrics = RuntimeMetrics(factory: prometheus.factory, expertNames: library.experts.map(\.name))
            if let metricsPort {
                server = try MetricsServer(port: metricsPort) { prometheus.render() }
                printer?.message("loadtest: metrics at http://127.0.0.1:\(server!.port)/metrics")
            }
        }
        let test = try LoadTest(library: library, options: try options(), runtimeOptions: runtimeOptions, instruments: instruments,
                                libraryDescription: description)
        return (test, export, server, generated)
    }

    /// Runs `test` (with `loop` instead of its own, if given), showing progress and keeping the metrics file current;
    /// `step` names a sweep's measurement in the opening message instead of the runtime's size.
    func run(_ test: LoadTest, loop: LoadTestOptions.Loop? = nil, step: String? = nil, printer: ProgressPrinter?,
             export: PrometheusExport?) throws -> LoadTestResult {
        let o = test.options
        let load: String
        switch loop ?? o.loop {
        case let .closed(clients): load = "closed loop, \(clients) clients"
        case let .open(rate, burstiness, maxConcurrency): load = "open loop, \(rate) req/s (burstiness \(burstiness)), at most \(maxConcurrency) in flight"
        }
        let span = o.duration.map { "\($0) s" } ?? "\(o.requests!) requests"
        let opening = step ?? "\(test.workload.layerCount) routed layers, \(test.workload.library.experts.count) experts, \(test.target.participants) participants"
        printer?.message("loadtest: \(opening); \(load); warm-up \(o.warmup) s, then \(span)")
        var metricsError: (any Error)? = nil
        let progress = { (progress: LoadTestProgress) in
            printer?.show(progress)
            if let export, let path = metricsFile, metricsError == nil {
                do { try export.write(to: path) } catch { metricsError = error }
            }
        }
        let result = if let loop { try test.run(loop: loop, progress: progress) } else { test.run(progress: progress) }
        printer?.finish()
        if let metricsError { throw metricsError }
        if let export, let path = metricsFile { try export.write(to: path) }
        return result
    }
}

struct LoadTestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "loadtest",
        abstract: "Drive a library with model-shaped requests (closed or open loop) and report throughput, latency, rejections and balance.",
        discussion: """
            Each request is T tokens passing every routed layer of the library in model order, each layer's input \
            derived from the previous layer's output (docs/loadtest.md). With no arguments: the built-in synthetic \
            T5-base library, 4 clients, 80% decode-like and 20% prefill-like requests, 3 s of warm-up and 20 s measured. \
            --clients 1,2,4,8,16 sweeps the counts on one runtime, --rounds times in alternating order, and reports each \
            count's medians and its throughput relative to 1 client.
            """
    )

    @OptionGroup var load: LoadTestFlags

    @Option(help: "Output format: text or json (stable field names; see docs/loadtest.md).")
    var format: OutputFormat = .text

    @Option(help: "Write the report to this file (atomically) instead of standard output.")
    var output: String?

    @OptionGroup var distributed: DistributedFlags

    @Option(parsing: .unconditional, help: "Sweep (--clients with several counts): rounds over the counts, forward then backward in turn (default 2); each count reports its median over rounds.")
    var rounds: Int?

    func validate() throws {
        if let rounds {
            guard load.isSweep else {
                throw ValidationError("--rounds: only with a sweep (--clients with several counts, such as 1,2,4), found --clients \(load.clients ?? "4 (the default)")")
            }
            guard rounds >= 1 && rounds <= LoadTestSweep.maximumRounds else {
                throw ValidationError("--rounds: expected 1 to \(LoadTestSweep.maximumRounds), found \(rounds)")
            }
        }
    }

    func run() throws {
        if distributed.mpi { return try runDistributed() }
        if load.isSweep { return try runSweep() }
        if let output { try OutputPath.refuseOverwriting(output, option: "--output", inputs: load.inputs) }
        let printer = load.printer()
        let (test, export, server, generated) = try load.makeTest(printer, instruments: LoadTestInstruments())
        defer { server?.stop() }
        var result = try load.run(test, printer: printer, export: export)
        result.generatedLibrarySeconds = generated
        let report = format == .json ? result.json().serialized() + "\n" : result.text()
        try emit(report, to: output)
        if result.failed > 0 {
            throw LoadTestError(.failedRequests, "loadtest: expected no failed requests, found \(result.failed) (first: \(result.firstFailure ?? "?"))")
        }
    }
}

extension LoadTestCommand {
    /// A client sweep: one runtime and library, every count in every round, then the table (or JSON rows).
    func runSweep() throws {
        if let output { try OutputPath.refuseOverwriting(output, option: "--output", inputs: load.inputs) }
        let sweep: LoadTestSweep
        do { sweep = try LoadTestSweep(clientCounts: try load.clientCounts(), rounds: rounds ?? 2) } catch let error as LoadTestError {
            throw ValidationError(error.message)
        }
        let printer = load.printer()
        let (test, export, server, generated) = try load.makeTest(printer, instruments: LoadTestInstruments())
        defer { server?.stop() }
        let steps = sweep.schedule.count
        printer?.message("loadtest: \(test.workload.layerCount) routed layers, \(test.workload.library.experts.count) experts, \(test.target.participants) participants; sweep of \(sweep.clientCounts.map(String.init).joined(separator: ",")) clients, \(sweep.rounds) round\(sweep.rounds == 1 ? "" : "s") (\(steps) measurements) on one runtime")
        var position = 0
        var result = try sweep.run { round, clients in
            position += 1
            let r = try load.run(test, loop: .closed(clients: clients), step: "measurement \(position)/\(steps) (round \(round))", printer: printer, export: export)
            let figures = String(format: "%.1f tok/s, %.2f req/s, p99 %.1f ms", r.tokenThroughput, r.requestThroughput, r.e2el.milliseconds(atPercentile: 99))
            printer?.message("loadtest: round \(round), \(clients) client\(clients == 1 ? "" : "s"): \(figures), \(r.rejected + r.failed + r.unfinished) errors")
            return r
        }
        result.generatedLibrarySeconds = generated
        let report = format == .json ? result.json().serialized() + "\n" : result.text()
        try emit(report, to: output)
        if result.failed > 0 {
            throw LoadTestError(.failedRequests, "loadtest: expected no failed requests, found \(result.failed) over the sweep (first: \(result.firstFailure ?? "?"))")
        }
    }
}

extension LoadTestCommand {
    /// `loadtest --mpi`: rank 0 drives a distributed runtime (the built-in library is generated there first if
    /// missing; the serving ranks load it when rank 0's hello arrives); the other ranks serve experts.
    func runDistributed() throws {
        let path = load.library ?? DefaultLibrary.cacheDirectory() + "/" + DefaultLibrary.fileName
        let memoryCap = load.runtimeFlags.memoryCap
        guard let world = try serveUnlessHost(memoryCap: memoryCap, load: { try ExpertLibrary.load(path: path) }) else { return }
        try hostingMPI(world) {
            if let output { try OutputPath.refuseOverwriting(output, option: "--output", inputs: load.inputs) }
            let printer = load.printer()
            let (library, description, generated) = try load.loadLibrary(printer)
            let runtime = try DistributedRuntime(library: library, world: world, options: distributed.options(
                routing: load.routing.options(defaults: library.routing, tokens: 0), memoryCap: memoryCap, experts: library.experts.count))
            printer?.message("loadtest: \(world.size) ranks: " + runtime.shares.map {
                "rank \($0.rank) \($0.experts) experts (\(String(format: "%.1f", Double($0.residentBytes) / 1_048_576)) MiB)"
            }.joined(separator: ", "))
            let test = try LoadTest(library: library, distributed: runtime, options: try load.options(), libraryDescription: description)
            var report: String
            var failed = 0, firstFailure: String? = nil
            if load.isSweep {
                let sweep: LoadTestSweep
                do { sweep = try LoadTestSweep(clientCounts: try load.clientCounts(), rounds: rounds ?? 2) } catch let error as LoadTestError {
                    throw ValidationError(error.message)
                }
                var result = try sweep.run { _, clients in try load.run(test, loop: .closed(clients: clients), printer: printer, export: nil) }
                result.generatedLibrarySeconds = generated
                report = format == .json ? result.json().serialized() + "\n" : result.text()
                failed = result.failed
                firstFailure = result.firstFailure
            } else {
                var result = try load.run(test, printer: printer, export: nil)
                result.generatedLibrarySeconds = generated
                report = format == .json ? result.json().serialized() + "\n" : result.text()
                failed = result.failed
                firstFailure = result.firstFailure
            }
            try emit(report, to: output)
            if failed > 0 {
                throw LoadTestError(.failedRequests, "loadtest: expected no failed requests, found \(failed) (first: \(firstFailure ?? "?"))")
            }
            return ((), runtime)
        }
    }
}

/// Writes `text` to `path` atomically, or to standard output.
func emit(_ text: String, to path: String?) throws {
    if let path {
        let file = try AtomicFile(path: path)
        try file.write(Array(text.utf8))
        try file.commit()
    } else {
        print(text, terminator: "")
    }
}
