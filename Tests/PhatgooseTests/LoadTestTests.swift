import Foundation
import PhatgooseFormats
import PhatgooseLibrary
@testable import PhatgooseLoadTest
import PhatgooseProfiling
import PhatgooseRouting
import PhatgooseRuntime
import PhatgooseSynth
import Testing

/// A tiny T5-shaped library (36 layers of width 32 and 64), quick enough for runs of about a second.
func tinyLibrary(experts: Int = 6) throws -> ExpertLibrary {
    try Synth.library(SynthOptions(shape: ModelShape.presets["tiny"]!, experts: experts, rank: 4, seed: 11))
}

func shortOptions(_ loop: LoadTestOptions.Loop, duration: Double = 1) -> LoadTestOptions {
    LoadTestOptions(loop: loop, duration: duration, warmup: 0.2, drainTimeout: 5, decodeFraction: 0.7, decodeTokens: 1...4,
                    prefillTokens: 16...48, seed: 3, progressInterval: 0.25)
}

@Suite(.serialized) struct LoadTestRunTests {
    @Test func closedLoopRunMeasuresAndTallies() throws {
        let library = try tinyLibrary()
        // Every participant is to have computed: small dispatches do not move to the caller alone when the worker's
        // CPU is contended (a slow, busy machine; ThreadSanitizer).
        let test = try LoadTest(library: library, options: shortOptions(.closed(clients: 2)),
                                runtimeOptions: RuntimeOptions(workers: 1, contendedMinTokens: 0))
        var reports = 0
        let result = test.run { _ in reports += 1 }
        // Counts and structure only: how much gets done in a second depends on the machine and its load.
        #expect(reports >= 1, "progress is reported while the test runs")
        #expect(result.completed > 0 && result.failed == 0 && result.rejected == 0)
        #expect(result.completed == result.completedDecode + result.completedPrefill)
        #expect(result.e2el.count == result.completed && result.service.count == result.completed)
        #expect(result.windowSeconds >= 1, "the window lasts at least --duration")
        #expect(result.requestThroughput > 0 && result.tokenThroughput >= result.requestThroughput)
        // Every routing decision in the window is tallied: each token chooses top-k experts at each of 36 layers.
        #expect(result.tally.decisions > 0 && result.tally.perLayer.allSatisfy { $0 > 0 })
        #expect(result.tokensPerExpert.reduce(0, +) == result.tally.decisions * test.target.routing.topK)
        #expect(result.workerUtilisation!.count == 2 && result.workerUtilisation!.allSatisfy { $0 > 0 && $0 <= 1 })
        #expect(result.runtimeStatistics.calls > 0 && result.phases!.calls > 0)
        // Window counters, the warm-up taken out of each: the dispatches beside another lane's are some of the dispatches.
        #expect(result.runtimeStatistics.dispatches > 0 && result.runtimeStatistics.concurrentDispatches <= result.runtimeStatistics.dispatches,
                "\(result.runtimeStatistics.concurrentDispatches) of \(result.runtimeStatistics.dispatches) dispatches beside another lane's")
        // One client holds one lane at a time: a second run on the same runtime counts none, whatever the first counted.
        let single = try test.run(loop: .closed(clients: 1))
        #expect(single.runtimeStatistics.concurrentDispatches == 0 && single.runtimeStatistics.dispatches > 0,
                "\(single.runtimeStatistics.concurrentDispatches) dispatches beside another lane's at 1 client (the first run: \(result.runtimeStatistics.concurrentDispatches))")
        // The JSON parses back with the stable field names.
        let json = try JSONParser.parse(Array(result.json().serialized().utf8))
        for field in ["request_throughput", "total_token_throughput", "mean_e2el_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms",
                      "p99.9_e2el_ms", "completed", "rejected", "failed", "tokens_per_expert", "expert_imbalance_max_over_mean",
                      "worker_utilisation", "layers", "duration", "mode", "num_clients"] {
            #expect(json[field] != nil, "missing \(field)")
        }
        #expect(json["mode"] == .string("closed"))
        #expect(result.text().contains("Request throughput (req/s):"))
    }

    @Test func openLoopSeparatesQueueingFromService() throws {
        let library = try tinyLibrary()
        let options = shortOptions(.open(rate: 40, burstiness: 1, maxConcurrency: 4), duration: 1.5)
        let test = try LoadTest(library: library, options: options, runtimeOptions: RuntimeOptions(workers: 1))
        let result = test.run()
        #expect(result.failed == 0 && result.rejected == 0)
        // About 40 req/s arrive for 1.5 s (Poisson: wide bounds). Arrivals, not completions, are what the seeded
        // schedule fixes: a slow machine finishes fewer of them inside the window, but they all arrive.
        #expect(result.completed > 0)
        let arrivals = try #require(result.arrivals)
        #expect(arrivals >= 25 && arrivals <= 110)
        // Every arrival of the window has an outcome, the ones no client had started yet included.
        #expect(result.completed + result.rejected + result.failed + result.unfinished == arrivals)
        #expect(result.queue.count == result.completed)
        // End to end = queueing + service for every request, so the means add up.
        let sum = result.queue.meanMilliseconds + result.service.meanMilliseconds
        #expect(abs(result.e2el.meanMilliseconds - sum) <= 0.01 * sum + 0.01)
        let json = try JSONParser.parse(Array(result.json().serialized().utf8))
        #expect(json["mode"] == .string("open") && json["mean_queue_ms"] != nil && json["max_backlog"] != nil)
    }

    @Test func overloadReportsRejectionsInsteadOfQueueing() throws {
        let library = try tinyLibrary()
        // Far more arrivals than one admitted call at a time can serve: calls beyond the bound are refused. The
        // clients fall behind the arrivals; the drain then serves (or refuses) the arrivals of the window they had
        // not taken yet, however slow the machine, as it ends once every one has an outcome.
        var options = shortOptions(.open(rate: 4000, burstiness: 1, maxConcurrency: 12))
        options.drainTimeout = 120
        let test = try LoadTest(library: library, options: options, runtimeOptions: RuntimeOptions(workers: 1, maxQueuedCalls: 1))
        let result = test.run()
        #expect(result.rejected > 0)
        #expect(result.runtimeStatistics.rejected > 0)
        #expect(result.failed == 0)
        // Refused calls end at once instead of piling up: every arrival of the window was completed or refused.
        #expect(result.unfinished == 0)
        #expect(result.completed + result.rejected == result.arrivals)
        let json = try JSONParser.parse(Array(result.json().serialized().utf8))
        #expect(json["rejected"] == .integer(result.rejected))
    }

    @Test func arrivalsNoClientStartedAreServedInTheDrainOrCountedUnfinished() throws {
        let library = try tinyLibrary()
        // One client and far more arrivals than it serves: at the window's end most arrivals are waiting for it.
        // No drain: whatever was not done at the window's end is unfinished, the arrivals never started included.
        var options = shortOptions(.open(rate: 20_000, burstiness: 1, maxConcurrency: 1), duration: 0.3)
        options.drainTimeout = 0
        let abandoned = try LoadTest(library: library, options: options, runtimeOptions: RuntimeOptions(workers: 0)).run()
        let arrivals = try #require(abandoned.arrivals)
        #expect(arrivals >= 4000, "about 6000 arrivals in 0.3 s")
        #expect(abandoned.completed + abandoned.rejected + abandoned.failed + abandoned.unfinished == arrivals)
        #expect(abandoned.unfinished > arrivals / 2, "one client cannot have started most of them")
        // A drain long enough serves every arrival of the window, the ones waiting for a client included: about 50
        // arrivals at once (no warm-up), far more than one client serves in the 0.02 s window. Few, so a slow
        // machine (a sanitizer) drains them well inside the timeout.
        options = shortOptions(.open(rate: 2500, burstiness: 1, maxConcurrency: 1), duration: 0.02)
        options.warmup = 0
        options.drainTimeout = 300
        let drained = try LoadTest(library: library, options: options, runtimeOptions: RuntimeOptions(workers: 0)).run()
        #expect(drained.unfinished == 0 && drained.rejected == 0 && drained.failed == 0)
        #expect(drained.completed == drained.arrivals && drained.completed >= 25)
    }

    /// Every field of a load test's JSON that is a measurement, not configuration (see
    /// `RunComparison.configurationFields`): together the two lists must cover every field.
    static let measurementFields: Set<String> = Set(
        ["completed", "completed_decode", "completed_prefill", "rejected", "failed", "unfinished", "arrivals", "first_error", "total_input_tokens",
         "request_throughput", "total_token_throughput", "decode", "prefill", "layer_calls", "runtime_rejected_calls", "dispatches", "merged_calls", "concurrent_dispatches", "lane_utilisation", "mean_call_wait_ms",
         "mean_executor_wait_per_request_ms", "tokens_per_expert", "expert_imbalance_max_over_mean", "expert_imbalance_excess_over_mean",
         "mean_layer_imbalance_max_over_mean", "max_layer_imbalance_max_over_mean", "layers", "worker_utilisation", "mean_worker_utilisation",
         "worker_imbalance_max_over_mean", "phase_us_per_call", "rss_start_bytes", "rss_end_bytes", "rss_max_bytes", "max_backlog",
         "library_generation_seconds", "timeline", "recorded_trace_events", "dropped_trace_events"]
        + ["e2el", "queue", "service"].flatMap { name in ["mean", "std", "median", "p90", "p99", "p99.9", "max"].map { "\($0)_\(name)_ms" } })

    @Test("comparing two real runs lists every configuration difference; every summary field is configuration or a measurement")
    func comparisonOfRealRuns() throws {
        let library = try tinyLibrary()
        let a = try LoadTest(library: library, options: shortOptions(.closed(clients: 1), duration: 0.4), runtimeOptions: RuntimeOptions(workers: 0)).run()
        var options = shortOptions(.open(rate: 200, burstiness: 2, maxConcurrency: 6), duration: 0.6)
        options.seed = 4
        options.decodeFraction = 0.5
        options.warmup = 0.1
        let routing = RoutingOptions(router: .arrow, topK: 3, granularity: .sequence(length: 8), arrowTemperature: 5)
        let b = try LoadTest(library: library, options: options,
                             runtimeOptions: RuntimeOptions(routing: routing, workers: 1, placement: .inPlace, memoryCapBytes: 1 << 30)).run()
        let ja = a.json(), jb = b.json()
        guard case let .object(fieldsA) = ja, case let .object(fieldsB) = jb else { Issue.record("a load test's JSON is an object"); return }
        let keys = Set(fieldsA.map(\.key)).union(fieldsB.map(\.key))
        let configuration = Set(RunComparison.configurationFields)
        #expect(keys.subtracting(configuration).subtracting(Self.measurementFields).isEmpty,
                "fields neither configuration nor measurement: \(keys.subtracting(configuration).subtracting(Self.measurementFields).sorted())")
        let comparison = RunComparison(a: ja, b: jb, pathA: "A", pathB: "B")
        let listed = Set(comparison.configuration.map(\.0))
        let differing = Set(configuration.filter { ja[$0].map { $0.serialized() } != jb[$0].map { $0.serialized() } })
        #expect(listed == differing)
        for field in ["mode", "num_clients", "max_concurrency", "request_rate", "burstiness", "decode_fraction", "seed", "workers", "router",
                      "top_k", "sequence_length", "arrow_temperature", "placement", "memory_cap_bytes", "warmup_duration", "duration"] {
            #expect(listed.contains(field), "\(field) differs but is not listed")
        }
        #expect(jb["placement"] == .string("in-place") && jb["sequence_length"] == .integer(8) && jb["memory_cap_bytes"] == .integer(1 << 30))
        #expect(ja["placement"] == .string("distribute") && ja["sequence_length"] == .null && ja["drain_timeout"] == .double(5))
    }

    @Test func requestCountEndsTheWindow() throws {
        let library = try tinyLibrary()
        var options = shortOptions(.closed(clients: 1))
        options.duration = nil
        options.requests = 12
        let result = try LoadTest(library: library, options: options, runtimeOptions: RuntimeOptions(workers: 0)).run()
        #expect(result.completed >= 12 && result.completed <= 13)
    }
}

@Suite struct LoadTestSweepTests {
    @Test func clientListsParse() throws {
        #expect(try ClientCounts.parse("4") == [4])
        #expect(try ClientCounts.parse("1,2,4,8,16") == [1, 2, 4, 8, 16])
        #expect(try ClientCounts.parse(" 8, 2 ,1") == [8, 2, 1], "blanks around items are ignored and the order is kept")
        #expect(try ClientCounts.parse("4096,1") == [4096, 1])
    }

    @Test(arguments: [
        ("1,,4", "--clients: expected a comma-separated list of client counts (such as 1,2,4,8,16), found an empty item at position 2 in \"1,,4\""),
        ("1,2,", "--clients: expected a comma-separated list of client counts (such as 1,2,4,8,16), found an empty item at position 3 in \"1,2,\""),
        ("", "--clients: expected a client count, or a comma-separated list of them (such as 1,2,4,8,16), found nothing"),
        ("0", "--clients: expected 1 to 4096, found 0"),
        ("1,0,4", "--clients: expected 1 to 4096, found 0 in \"1,0,4\""),
        ("2,4097", "--clients: expected 1 to 4096, found 4097 in \"2,4097\""),
        ("four", "--clients: expected a whole number of clients from 1 to 4096, found \"four\""),
        ("1,2.5", "--clients: expected every item to be a whole number of clients from 1 to 4096, found \"2.5\" in \"1,2.5\""),
        ("1,2,4,2", "--clients: expected distinct client counts, found 2 twice in \"1,2,4,2\""),
    ])
    func badClientListsNameTheOption(_ text: String, _ message: String) {
        let error = #expect(throws: LoadTestError.self) { try ClientCounts.parse(text) }
        #expect(error?.code == .option)
        #expect(error?.message == message)
    }

    @Test func roundsAlternateTheOrder() throws {
        let sweep = try LoadTestSweep(clientCounts: [1, 2, 4], rounds: 3)
        #expect(sweep.schedule.map(\.clients) == [1, 2, 4, 4, 2, 1, 1, 2, 4])
        #expect(sweep.schedule.map(\.round) == [1, 1, 1, 2, 2, 2, 3, 3, 3])
        #expect(sweep.baselineClients == 1)
        #expect(try LoadTestSweep(clientCounts: [4, 2, 1]).baselineClients == 1, "1 client is the baseline wherever it is listed")
        #expect(try LoadTestSweep(clientCounts: [2, 8]).baselineClients == 2, "else the first count")
        #expect(try LoadTestSweep(clientCounts: [2, 8]).rounds == 2, "two rounds by default")
        for (counts, rounds, message) in [([1, 2], 0, "--rounds: expected 1 to 1000, found 0"), ([Int](), 2, "--clients: expected at least one client count, found none"),
                                          ([2, 2], 2, "--clients: expected distinct client counts, found 2 twice in \"2,2\"")] {
            let error = #expect(throws: LoadTestError.self) { try LoadTestSweep(clientCounts: counts, rounds: rounds) }
            #expect(error?.message == message)
        }
    }

    @Test func medianOfOddEvenAndMissing() {
        #expect(LoadTestSweepResult.median([3, 1, 2]) == 2)
        #expect(LoadTestSweepResult.median([4, 1]) == 2.5)
        #expect(LoadTestSweepResult.median([.nan, 5]) == 5)
        #expect(LoadTestSweepResult.median([]).isNaN)
    }

    @Test func aLoopOutOfRangeIsRefusedBeforeRunning() throws {
        let test = try LoadTest(library: try tinyLibrary(), options: shortOptions(.closed(clients: 1)), runtimeOptions: RuntimeOptions(workers: 0))
        let error = #expect(throws: LoadTestError.self) { try test.run(loop: .closed(clients: 0)) }
        #expect(error?.message == "--clients: expected 1 to 4096, found 0")
    }

    @Test func tinySweepReportsOneRowPerCountFromItsMedians() throws {
        var options = shortOptions(.closed(clients: 1), duration: 0.3)
        options.warmup = 0.05
        let test = try LoadTest(library: try tinyLibrary(), options: options, runtimeOptions: RuntimeOptions(workers: 1))
        let sweep = try LoadTestSweep(clientCounts: [2, 1, 3], rounds: 2)
        var ran: [Int] = []
        let result = try sweep.run { round, clients in
            ran.append(clients)
            return try test.run(loop: .closed(clients: clients))
        }
        #expect(ran == [2, 1, 3, 3, 1, 2], "forward, then backward")
        #expect(result.measurements.map(\.position) == Array(1...6))
        let rows = result.rows
        #expect(rows.map(\.clients) == [2, 1, 3], "one row per count, in the order given")
        let base = try #require(rows.first { $0.clients == 1 })
        for row in rows {
            #expect(row.measurements.map(\.round) == [1, 2] && row.measurements.allSatisfy { $0.clients == row.clients })
            #expect(row.measurements.allSatisfy { $0.tokenThroughput > 0 && $0.completed > 0 && $0.windowSeconds >= 0.3 })
            #expect(row.errors == 0)
            // Two rounds: the median is the mean of the two, and the ratio is taken between medians.
            let median = (row.measurements[0].tokenThroughput + row.measurements[1].tokenThroughput) / 2
            #expect(abs(row.tokenThroughput - median) <= 1e-9 * median)
            #expect(abs(row.throughputRatio - row.tokenThroughput / base.tokenThroughput) <= 1e-12)
            #expect(row.p50Milliseconds > 0 && row.p99Milliseconds >= row.p50Milliseconds)
            #expect(row.residentBytesMax == row.measurements.map(\.residentBytesMax).max())
        }
        #expect(base.throughputRatio == 1)

        let json = try JSONParser.parse(Array(result.json().serialized().utf8))
        #expect(json["mode"] == .string("closed_sweep") && json["rounds"] == .integer(2) && json["baseline_clients"] == .integer(1))
        #expect(json["client_counts"] == .array([.integer(2), .integer(1), .integer(3)]))
        #expect(json["round_orders"] == .array([.array([.integer(2), .integer(1), .integer(3)]), .array([.integer(3), .integer(1), .integer(2)])]))
        for field in ["library", "num_layers", "num_experts", "router", "top_k", "workers", "executor", "max_queued_calls", "decode_fraction",
                      "decode_tokens", "prefill_tokens", "affinity", "skew", "seed", "warmup_duration", "duration"] {
            #expect(json[field] != nil, "missing \(field)")
        }
        #expect(json["workers"] == .integer(1) && json["duration"] == .double(0.3))
        guard case let .array(jsonRows)? = json["rows"] else { Issue.record("no rows array"); return }
        #expect(jsonRows.count == 3)
        for (row, jsonRow) in zip(rows, jsonRows) {
            #expect(jsonRow["num_clients"] == .integer(row.clients))
            #expect(jsonRow["total_token_throughput"] == .double(row.tokenThroughput))
            #expect(jsonRow["throughput_ratio"] == .double(row.throughputRatio))
            for field in ["request_throughput", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms", "errors", "rss_max_bytes"] {
                #expect(jsonRow[field] != nil, "row lacks \(field)")
            }
            guard case let .array(perRound)? = jsonRow["rounds"] else { Issue.record("row lacks rounds"); continue }
            let expected: [JSONValue?] = row.measurements.map { .double($0.tokenThroughput) }
            #expect(perRound.map { $0["total_token_throughput"] } == expected)
        }
        let text = result.text()
        #expect(text.contains("client sweep") && text.contains("vs 1"))
        for row in rows {
            #expect(text.split(separator: "\n").contains { $0.split(separator: " ").first == Substring(String(row.clients)) }, "no table line for \(row.clients)")
        }
    }
}

@Suite struct LoadTestWorkloadTests {
    @Test func requestsAreDeterministicAndFollowTheMix() throws {
        let library = try tinyLibrary()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 0))
        defer { runtime.shutdown() }
        let options = LoadTestOptions(decodeFraction: 0.25, decodeTokens: 2...3, prefillTokens: 100...120, seed: 9)
        let a = try ModelWorkload(runtime: runtime, options: options), b = try ModelWorkload(runtime: runtime, options: options)
        let requests = (0..<2000).map { a.request($0) }
        #expect(requests == (0..<2000).map { b.request($0) })
        let decode = requests.filter { $0.kind == .decode }
        #expect(abs(Double(decode.count) / 2000 - 0.25) < 0.04)
        #expect(decode.allSatisfy { (2...3).contains($0.tokens) })
        #expect(requests.filter { $0.kind == .prefill }.allSatisfy { (100...120).contains($0.tokens) })
        // Zipf skew 1: expert 0 is the most frequent profile.
        let counts = Dictionary(grouping: requests, by: \.profileExpert).mapValues(\.count)
        #expect(counts[0]! > counts[library.experts.count - 1] ?? 0)
    }

    @Test(arguments: [1.0, 0.5, 4.0])
    func arrivalGapsHaveTheRequestedMean(_ burstiness: Double) {
        var process = ArrivalProcess(rate: 50, burstiness: burstiness, seed: 1)
        let gaps = (0..<20_000).map { _ in process.nextGap() }
        let mean = gaps.reduce(0, +) / Double(gaps.count)
        #expect(abs(mean - 0.02) < 0.02 * 0.05)
        // Gamma(shape) gaps: the squared coefficient of variation is 1/shape (1 for Poisson).
        let variance = gaps.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(gaps.count)
        #expect(abs(variance / (mean * mean) - 1 / burstiness) < 0.1 / burstiness)
    }

    @Test func resizeTilesFoldsAndCopies() {
        let source: [Float] = [1, 2, 3, 4, 5, 6]
        var wide = [Float](repeating: 0, count: 8), narrow = [Float](repeating: 0, count: 4), same = [Float](repeating: 1, count: 6)
        source.withUnsafeBufferPointer { s in
            wide.withUnsafeMutableBufferPointer { RequestRunner.resize(s.baseAddress!, width: 6, into: $0.baseAddress!, width: 8, rows: 1, accumulate: false) }
            narrow.withUnsafeMutableBufferPointer { RequestRunner.resize(s.baseAddress!, width: 6, into: $0.baseAddress!, width: 4, rows: 1, accumulate: false) }
            same.withUnsafeMutableBufferPointer { RequestRunner.resize(s.baseAddress!, width: 6, into: $0.baseAddress!, width: 6, rows: 1, accumulate: true) }
        }
        #expect(wide == [1, 2, 3, 4, 5, 6, 1, 2])
        let scale = Float((4.0 / 6.0).squareRoot())
        let expected: [Float] = [(1 + 5) * scale, (2 + 6) * scale, 3 * scale, 4 * scale]
        #expect(zip(narrow, expected).allSatisfy { abs($0 - $1) < 1e-6 })
        #expect(same == [2, 3, 4, 5, 6, 7])
    }

    @Test func optionsRefuseNonsense() {
        for (options, message) in [(LoadTestOptions(loop: .closed(clients: 0)), "--clients: expected 1 to 4096, found 0"),
                                    (LoadTestOptions(loop: .open(rate: 0, burstiness: 1, maxConcurrency: 4)), "--rate: expected requests per second > 0, found 0.0"),
                                    (LoadTestOptions(duration: nil, requests: nil), "--duration, --requests: expected either a duration or a request count, found neither"),
                                    (LoadTestOptions(decodeFraction: 1.5), "--decode-fraction: expected 0 to 1, found 1.5")] {
            let error = #expect(throws: LoadTestError.self) { try options.validate() }
            #expect(error?.code == .option && error?.message == message)
        }
        #expect(throws: Never.self) { try LoadTestOptions().validate() }
    }

    @Test func defaultLibraryCacheDirectory() {
        #expect(DefaultLibrary.cacheDirectory(environment: ["PHATGOOSE_CACHE": "/c", "HOME": "/h"]) == "/c")
        #expect(DefaultLibrary.cacheDirectory(environment: ["XDG_CACHE_HOME": "/x", "HOME": "/h"]) == "/x/phatgoose")
        #expect(DefaultLibrary.cacheDirectory(environment: ["HOME": "/h"]) == "/h/.cache/phatgoose")
        #expect(DefaultLibrary.fileName.hasSuffix(".phatpack") && DefaultLibrary.fileName.contains("t5-base"))
    }
}

@Suite struct LoadTestMetricsTests {
    @Test func metricsServerAnswersOnLoopback() throws {
        let server = try MetricsServer(port: 0) { Array("phatgoose_calls_total 5\n".utf8) }
        defer { server.stop() }
        #expect(server.port > 0)
        let ok = try httpGet(port: server.port, path: "/metrics")
        #expect(ok.hasPrefix("HTTP/1.1 200 OK\r\n"))
        #expect(ok.contains("Content-Type: text/plain; version=0.0.4"))
        #expect(ok.hasSuffix("\r\n\r\nphatgoose_calls_total 5\n"))
        #expect(try httpGet(port: server.port, path: "/nothing").hasPrefix("HTTP/1.1 404"))
    }

    @Test func prometheusFileIsWrittenAtomically() throws {
        let directory = TemporaryDirectory()
        let export = PrometheusExport()
        let metrics = RuntimeMetrics(factory: export.factory, expertNames: ["a"])
        metrics.observe(RuntimeEvent(kind: .call, worker: 0, node: 0, layer: 0, expert: -1, rows: 1, start: 0, end: 120_000))
        try export.write(to: directory.file("metrics.prom"))
        let text = try String(contentsOfFile: directory.file("metrics.prom"), encoding: .utf8)
        #expect(text.contains("phatgoose_call_duration_seconds_bucket"))
        #expect(text.contains("phatgoose_call_duration_seconds_count 1"))
    }

    /// A GET over a raw loopback socket.
    func httpGet(port: Int, path: String) throws -> String {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr = in_addr(s_addr: UInt32(0x7F00_0001).bigEndian)
        let connected = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard connected == 0 else { throw LoadTestError(.io, "connect failed") }
        let request = Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".utf8)
        _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            response += buffer[0..<n]
        }
        return String(decoding: response, as: UTF8.self)
    }
}
