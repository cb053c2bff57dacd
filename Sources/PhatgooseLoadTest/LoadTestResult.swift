import PhatgooseFormats
import PhatgooseProfiling
import PhatgooseRouting
import PhatgooseDistributed
import PhatgooseRuntime

/// What a load test measured. ``json()`` gives the stable machine-readable form (field names follow vLLM's
/// `benchmark_serving` where one exists: `request_throughput`, `total_token_throughput`, `mean_e2el_ms`,
/// `p99_e2el_ms`, ...), ``text()`` the readable summary. `docs/loadtest.md` defines every field.
public struct LoadTestResult: Sendable {
    /// One progress interval of the measured window.
    public struct TimelinePoint: Sendable {
        public var seconds: Double
        public var completed: Int
        public var requestRate: Double
        public var tokenRate: Double
        public var p99Milliseconds: Double
        public var inFlight: Int
        public var backlog: Int
        public var residentBytes: Int
    }

    public var libraryDescription: String
    public var layerNames: [String]
    public var expertNames: [String]
    /// Candidate experts of each layer.
    public var candidates: [[Int]]
    public var options: LoadTestOptions
    public var participantNodes: [Int]
    public var participantCPUs: [Int?]
    public var executor: String
    public var maxQueuedCalls: Int
    public var topK: Int
    public var router: String
    /// Length of the measured window.
    public var windowSeconds: Double
    var statistics: RequestStatistics
    /// Runtime counters over the window.
    public var runtimeStatistics: RuntimeStatistics
    /// Phase sums over the window (nil without accounting).
    public var phases: PhaseTotals?
    /// Routing decisions made in the window.
    public var tally: RoutingTally
    public var residentBytesStart: Int
    public var residentBytesEnd: Int
    public var residentBytesMax: Int
    public var timeline: [TimelinePoint]
    /// Open loop: most arrivals ever due but not yet started.
    public var maxBacklog: Int
    /// Seconds spent generating the built-in library in this run, if it was.
    public var generatedLibrarySeconds: Double? = nil
    /// The routing in force (granularity, Arrow's settings), for the summary's configuration fields; nil (null in
    /// JSON) when not known.
    public var routing: RoutingOptions? = nil
    /// The runtime's options (placement, memory cap), for the summary's configuration fields; nil when not known.
    public var runtimeOptions: RuntimeOptions? = nil
    /// The runtime's topology, for the summary's configuration fields; nil when not known.
    public var topology: Topology? = nil
    /// With a distributed runtime (`--mpi`): what each rank holds.
    public var ranks: [RankShare]? = nil
    /// Open loop: arrivals the seeded schedule placed in the window, counted apart from the clients; every one of
    /// them is completed, rejected, failed or unfinished. Nil for a closed loop.
    public var arrivals: Int? = nil

    // MARK: Figures

    public var completed: Int { statistics.completed }
    public var completedDecode: Int { statistics.completedDecode }
    public var completedPrefill: Int { statistics.completedPrefill }
    public var rejected: Int { statistics.rejected }
    public var failed: Int { statistics.failed }
    public var unfinished: Int { statistics.unfinished }
    public var firstFailure: String? { statistics.firstFailure }
    public var measuredTokens: Int { statistics.measuredTokens }
    /// End-to-end latency of measured requests: scheduled arrival (open loop) or start (closed loop) to completion.
    public var e2el: LatencyHistogram { statistics.e2el }
    /// Open loop: scheduled arrival to the start of service.
    public var queue: LatencyHistogram { statistics.queue }
    /// Start of service to completion.
    public var service: LatencyHistogram { statistics.service }
    public var decodeLatency: LatencyHistogram { statistics.decode }
    public var prefillLatency: LatencyHistogram { statistics.prefill }

    /// Requests completed per second inside the window.
    public var requestThroughput: Double { windowSeconds > 0 ? Double(statistics.windowCompletions) / windowSeconds : 0 }
    /// Tokens of requests completed per second inside the window (every token passes every routed layer).
    public var tokenThroughput: Double { windowSeconds > 0 ? Double(statistics.windowTokens) / windowSeconds : 0 }

    public var isOpenLoop: Bool { if case .open = options.loop { return true } else { return false } }

    /// Token assignments per expert in the window.
    public var tokensPerExpert: [Int] { tally.perExpert }
    public var expertImbalance: LoadImbalance { LoadImbalance(counts: tokensPerExpert) }

    /// Imbalance of each layer over its candidate experts.
    public var layerImbalance: [LoadImbalance] {
        (0..<tally.layers).map { LoadImbalance(counts: tally.counts(layer: $0, candidates: $0 < candidates.count ? candidates[$0] : Array(0..<tally.experts))) }
    }

    /// Share of the window each participant spent computing.
    public var workerUtilisation: [Double]? {
        guard let phases, windowSeconds > 0 else { return nil }
        return phases.participants.prefix(participantNodes.count).map { min(1, Double($0.busyNanoseconds) / (windowSeconds * 1e9)) }
    }

    /// Share of the window each lane after the first spent computing (its holders report after the workers).
    public var laneUtilisation: [Double]? {
        guard let phases, windowSeconds > 0, phases.participants.count > participantNodes.count else { return nil }
        return phases.participants.dropFirst(participantNodes.count).map { min(1, Double($0.busyNanoseconds) / (windowSeconds * 1e9)) }
    }

    /// Mean wait of a layer call for the executor, in ms.
    public var meanCallWaitMilliseconds: Double? {
        guard let phases, phases.queuedCalls > 0 else { return nil }
        return Double(phases.queuedNanoseconds) / Double(phases.queuedCalls) / 1e6
    }

    /// Time a completed request spent, over all its layer calls, waiting for the executor (the runtime's queue), in ms:
    /// the window's total executor wait over the requests completed in it.
    public var executorWaitPerRequestMilliseconds: Double? {
        guard let phases, statistics.windowCompletions > 0 else { return nil }
        return Double(phases.queuedNanoseconds) / Double(statistics.windowCompletions) / 1e6
    }

    /// Phase time per layer call in microseconds (summed over participants).
    public var phaseMicrosecondsPerCall: [(String, Double)]? {
        guard let phases, phases.calls > 0 else { return nil }
        let kinds: [RuntimeEvent.Kind] = [.queued, .routing, .plan, .item, .steal, .combine, .call]
        return kinds.map { kind in
            let total = phases.participants.reduce(UInt64(0)) { $0 + $1[kind] }
            return (kind.rawValue, Double(total) / Double(phases.calls) / 1000)
        }
    }

    // MARK: JSON

    public func json() -> JSONValue {
        func num(_ v: Double) -> JSONValue { v.isFinite ? .double(v) : .null }
        func latencyFields(_ h: LatencyHistogram, _ name: String) -> [(String, JSONValue)] {
            [("mean_\(name)_ms", num(h.meanMilliseconds)), ("std_\(name)_ms", num(h.standardDeviationMilliseconds)),
             ("median_\(name)_ms", num(h.medianMilliseconds)), ("p90_\(name)_ms", num(h.milliseconds(atPercentile: 90))),
             ("p99_\(name)_ms", num(h.milliseconds(atPercentile: 99))), ("p99.9_\(name)_ms", num(h.milliseconds(atPercentile: 99.9))),
             ("max_\(name)_ms", num(h.maxMilliseconds))]
        }
        var fields: [(String, JSONValue)] = [("tool", .string("phatgoose loadtest")), ("format_version", .integer(1))]
        fields += servedFields()
        if let ranks {
            fields.append(("ranks", .array(ranks.map { share in
                .object([("rank", .integer(share.rank)), ("resident_bytes", .integer(share.residentBytes)), ("experts", .integer(share.experts)),
                         ("process_bytes", .integer(share.processBytes))])
            })))
        }
        switch options.loop {
        case let .closed(clients):
            fields += [("mode", .string("closed")), ("num_clients", .integer(clients)), ("max_concurrency", .integer(clients)),
                       ("request_rate", .null), ("burstiness", .null)]
        case let .open(rate, burstiness, maxConcurrency):
            fields += [("mode", .string("open")), ("num_clients", .null), ("max_concurrency", .integer(maxConcurrency)),
                       ("request_rate", num(rate)), ("burstiness", num(burstiness))]
        }
        fields += workloadFields()
        fields += [
            ("warmup_duration", num(options.warmup)), ("requests", options.requests.map { .integer($0) } ?? .null),
            ("duration", num(windowSeconds)), ("drain_timeout", num(options.drainTimeout)),
            ("completed", .integer(completed)), ("completed_decode", .integer(completedDecode)), ("completed_prefill", .integer(completedPrefill)),
            ("rejected", .integer(rejected)), ("failed", .integer(failed)), ("unfinished", .integer(unfinished)),
            ("arrivals", arrivals.map { .integer($0) } ?? .null), ("first_error", firstFailure.map { .string($0) } ?? .null),
            ("total_input_tokens", .integer(measuredTokens)),
            ("request_throughput", num(requestThroughput)), ("total_token_throughput", num(tokenThroughput)),
        ]
        fields += latencyFields(e2el, "e2el")
        fields += latencyFields(queue, "queue")
        fields += latencyFields(service, "service")
        fields += [
            ("decode", .object(latencyFields(decodeLatency, "e2el"))),
            ("prefill", .object(latencyFields(prefillLatency, "e2el"))),
            ("layer_calls", .integer(runtimeStatistics.calls)), ("runtime_rejected_calls", .integer(runtimeStatistics.rejected)),
            ("dispatches", .integer(runtimeStatistics.dispatches)), ("merged_calls", .integer(runtimeStatistics.mergedCalls)),
            ("concurrent_dispatches", .integer(runtimeStatistics.concurrentDispatches)),
            ("mean_call_wait_ms", meanCallWaitMilliseconds.map(num) ?? .null),
            ("mean_executor_wait_per_request_ms", executorWaitPerRequestMilliseconds.map(num) ?? .null),
        ]
        let perExpert = tokensPerExpert
        let assignments = max(1, perExpert.reduce(0, +))
        fields.append(("tokens_per_expert", .array(perExpert.enumerated().map { e, count in
            .object([("index", .integer(e)), ("expert", .string(e < expertNames.count ? expertNames[e] : "expert\(e)")),
                     ("tokens", .integer(count)), ("share", num(Double(count) / Double(assignments)))])
        })))
        let expert = expertImbalance
        fields += [("expert_imbalance_max_over_mean", num(expert.maxOverMean)), ("expert_imbalance_excess_over_mean", num(expert.excessOverMean))]
        let layers = layerImbalance
        let routed = layers.filter { $0.total > 0 }
        fields += [
            ("mean_layer_imbalance_max_over_mean", num(routed.isEmpty ? 1 : routed.reduce(0) { $0 + $1.maxOverMean } / Double(routed.count))),
            ("max_layer_imbalance_max_over_mean", num(routed.map(\.maxOverMean).max() ?? 1)),
        ]
        fields.append(("layers", .array(layers.enumerated().map { l, imbalance in
            var entry: [(String, JSONValue)] = [("index", .integer(l)), ("layer", .string(layerNames[l])), ("tokens", .integer(imbalance.total)),
                                                ("max_over_mean", num(imbalance.maxOverMean)), ("excess_over_mean", num(imbalance.excessOverMean))]
            if let phases, l < phases.layers.count, phases.layers[l].calls > 0 {
                entry.append(("mean_call_ms", num(Double(phases.layers[l].nanoseconds) / Double(phases.layers[l].calls) / 1e6)))
            }
            return .object(entry)
        })))
        if let utilisation = workerUtilisation {
            fields.append(("worker_utilisation", .array(utilisation.enumerated().map { p, busy in
                .object([("participant", .integer(p)), ("node", .integer(participantNodes[p])),
                         ("cpu", participantCPUs[p].map { .integer($0) } ?? .null), ("busy", num(busy)),
                         ("item_rows", .integer(phases!.participants[p].itemRows))])
            })))
            fields.append(("mean_worker_utilisation", num(utilisation.reduce(0, +) / Double(max(1, utilisation.count)))))
            if let lanes = laneUtilisation {
                fields.append(("lane_utilisation", .array(lanes.enumerated().map { l, busy in .object([("lane", .integer(l + 1)), ("busy", num(busy))]) })))
            }
            let rows = LoadImbalance(counts: phases!.participants.prefix(participantNodes.count).map(\.itemRows))
            fields.append(("worker_imbalance_max_over_mean", num(rows.maxOverMean)))
        }
        if let perCall = phaseMicrosecondsPerCall {
            fields.append(("phase_us_per_call", .object(perCall.map { ($0.0, num($0.1)) })))
        }
        fields += [("rss_start_bytes", .integer(residentBytesStart)), ("rss_end_bytes", .integer(residentBytesEnd)),
                   ("rss_max_bytes", .integer(residentBytesMax))]
        if isOpenLoop { fields.append(("max_backlog", .integer(maxBacklog))) }
        if let generatedLibrarySeconds { fields.append(("library_generation_seconds", num(generatedLibrarySeconds))) }
        fields.append(("timeline", .array(timeline.map { p in
            .object([("t", num(p.seconds)), ("completed", .integer(p.completed)), ("request_throughput", num(p.requestRate)),
                     ("token_throughput", num(p.tokenRate)), ("p99_e2el_ms", num(p.p99Milliseconds)), ("in_flight", .integer(p.inFlight)),
                     ("backlog", .integer(p.backlog)), ("rss_bytes", .integer(p.residentBytes))])
        })))
        return .object(fields)
    }

    /// What was served: the library, its size and the routing (the JSON's opening fields).
    func servedFields() -> [(String, JSONValue)] {
        [("library", .string(libraryDescription)), ("num_layers", .integer(layerNames.count)), ("num_experts", .integer(expertNames.count)),
         ("router", .string(router)), ("top_k", .integer(topK))]
    }

    /// The workload, the runtime, routing settings and placement (the JSON's fields after the loop's).
    func workloadFields() -> [(String, JSONValue)] {
        func num(_ v: Double) -> JSONValue { v.isFinite ? .double(v) : .null }
        let sequenceLength: JSONValue = if case let .sequence(length)? = routing?.granularity { .integer(length) } else { .null }
        return [
            ("decode_fraction", num(options.decodeFraction)),
            ("decode_tokens", .array([.integer(options.decodeTokens.lowerBound), .integer(options.decodeTokens.upperBound)])),
            ("prefill_tokens", .array([.integer(options.prefillTokens.lowerBound), .integer(options.prefillTokens.upperBound)])),
            ("affinity", num(options.affinity)), ("skew", num(options.skew)), ("seed", .integer(options.seed)),
            ("workers", .integer(participantNodes.count - 1)), ("lanes", .integer(lanes)), ("executor", .string(executor)), ("max_queued_calls", .integer(maxQueuedCalls)),
            ("sequence_length", sequenceLength),
            ("arrow_temperature", routing.map { num(Double($0.arrowTemperature)) } ?? .null),
            ("arrow_scaled", routing.map { .bool($0.arrowScaled) } ?? .null),
            ("placement", runtimeOptions.map { .string(Self.describe($0.placement)) } ?? .null),
            ("memory_cap_bytes", runtimeOptions?.memoryCapBytes.map { .integer($0) } ?? .null),
            ("topology", topology.map { .string($0.description) } ?? .null),
        ]
    }

    /// A placement as `--placement` spells it.
    static func describe(_ placement: PlacementPolicy) -> String {
        switch placement {
        case .distribute: return "distribute"
        case let .isolate(node): return "isolate:\(node)"
        case let .replicateHot(count): return "replicate:\(count)"
        case .inPlace: return "in-place"
        }
    }

    // MARK: Text

    public func text() -> String {
        var out = "============ Phatgoose load test ============\n"
        func line(_ key: String, _ value: String) { out += key.padding(toLength: 36) + value + "\n" }
        line("Library:", libraryDescription)
        line("Routing:", routingSummary)
        switch options.loop {
        case let .closed(clients): line("Load:", "closed loop, \(clients) client\(clients == 1 ? "" : "s")")
        case let .open(rate, burstiness, maxConcurrency):
            line("Load:", "open loop, \(fmt(rate)) req/s, " + (burstiness == 1 ? "Poisson arrivals" : "gamma arrivals (burstiness \(fmt(burstiness)))")
                 + ", at most \(maxConcurrency) in flight")
        }
        line("Requests:", requestsSummary)
        line("Runtime:", runtimeSummary)
        for share in ranks ?? [] {
            line("  rank \(share.rank):", "\(share.experts) experts, \(fmt(Double(share.residentBytes) / 1_048_576)) MiB of expert weights")
        }
        line("Measured:", "\(fmt(windowSeconds)) s after \(fmt(options.warmup)) s of warm-up")
        out += "---------------------------------------------\n"
        if let arrivals { line("Arrivals in the window:", "\(arrivals)") }
        line("Completed requests:", "\(completed) (\(completedDecode) decode, \(completedPrefill) prefill)")
        line("Rejected (overloaded):", "\(rejected)" + (runtimeStatistics.rejected > 0 ? " (\(runtimeStatistics.rejected) layer calls refused)" : ""))
        line("Failed:", "\(failed)" + (firstFailure.map { " (first: \($0))" } ?? ""))
        if unfinished > 0 { line("Unfinished (drain timeout):", "\(unfinished)" + (arrivals != nil ? " (in flight or not yet started)" : "")) }
        line("Request throughput (req/s):", fmt(requestThroughput))
        line("Token throughput (tok/s):", fmt(tokenThroughput))
        out += "---------------- Latency (ms) ----------------\n"
        out += "".padding(toLength: 16) + ["mean", "median", "p90", "p99", "p99.9", "max"].map { $0.leftPadding(toLength: 9) }.joined() + "\n"
        func row(_ name: String, _ h: LatencyHistogram) {
            guard !h.isEmpty else { return }
            out += name.padding(toLength: 16) + [h.meanMilliseconds, h.medianMilliseconds, h.milliseconds(atPercentile: 90), h.milliseconds(atPercentile: 99),
                                                 h.milliseconds(atPercentile: 99.9), h.maxMilliseconds].map { fmt($0).leftPadding(toLength: 9) }.joined() + "\n"
        }
        row("end-to-end", e2el)
        row("  decode", decodeLatency)
        row("  prefill", prefillLatency)
        if isOpenLoop {
            row("queueing", queue)
            row("service", service)
        }
        out += "---------------- Runtime ---------------------\n"
        line("Layer calls:", "\(runtimeStatistics.calls)" + (meanCallWaitMilliseconds.map { ", mean wait for the executor \(fmt($0)) ms" } ?? ""))
        line("Dispatches:", "\(runtimeStatistics.dispatches) (\(runtimeStatistics.mergedCalls) calls served with others; "
                + "\(runtimeStatistics.concurrentDispatches) beside another lane's)")
        if let wait = executorWaitPerRequestMilliseconds {
            line("Executor wait per request:", "\(fmt(wait)) ms (the runtime's queue, over all of a request's layer calls)")
        }
        if let utilisation = workerUtilisation {
            line("Worker utilisation:", utilisation.enumerated().map { p, busy in
                (p == 0 ? "caller" : "worker \(p)") + " \(Int((busy * 100).rounded()))%"
            }.joined(separator: ", ") + (laneUtilisation.map { lanes in
                "; " + lanes.enumerated().map { "lane \($0.offset + 1) \(Int(($0.element * 100).rounded()))%" }.joined(separator: ", ")
            } ?? ""))
        }
        let perExpert = tokensPerExpert
        let assignments = max(1, perExpert.reduce(0, +))
        let expert = expertImbalance
        line("Expert load:", "max/mean \(fmt(expert.maxOverMean)), (max-mean)/mean \(fmt(expert.excessOverMean))")
        let top = perExpert.enumerated().sorted { $0.element > $1.element }.prefix(4)
        line("  busiest experts:", top.map { "\(expertNames[$0.offset]) \(fmt(100 * Double($0.element) / Double(assignments)))%" }.joined(separator: ", "))
        let layers = layerImbalance.enumerated().filter { $0.element.total > 0 }
        if !layers.isEmpty {
            let mean = layers.reduce(0) { $0 + $1.element.maxOverMean } / Double(layers.count)
            line("Layer imbalance:", "mean max/mean \(fmt(mean)) over \(layers.count) layers")
            for entry in layers.sorted(by: { $0.element.maxOverMean > $1.element.maxOverMean }).prefix(3) {
                line("  " + "worst:", "\(layerNames[entry.offset]) \(fmt(entry.element.maxOverMean))")
            }
        }
        line("Memory (RSS):", "\(mib(residentBytesStart)) at start, \(mib(residentBytesEnd)) at end, \(mib(residentBytesMax)) max")
        if isOpenLoop { line("Arrival backlog:", "at most \(maxBacklog) arrivals waiting for a free client") }
        out += "=============================================\n"
        return out
    }

    /// The summary's routing, request mix and runtime lines.
    var routingSummary: String { "\(router), top-\(topK), \(layerNames.count) routed layers per request" }
    var requestsSummary: String {
        let decodePct = Int((options.decodeFraction * 100).rounded())
        return "\(decodePct)% decode (\(options.decodeTokens.lowerBound)-\(options.decodeTokens.upperBound) tokens), \(100 - decodePct)% prefill (\(options.prefillTokens.lowerBound)-\(options.prefillTokens.upperBound) tokens)"
    }
    /// Dispatch lanes of the runtime (1 for a distributed one: it serves one call at a time).
    var lanes: Int { runtimeOptions.map { $0.lanes ?? participantNodes.count } ?? 1 }
    var runtimeSummary: String {
        if let ranks {
            return "distributed over \(ranks.count) MPI rank\(ranks.count == 1 ? "" : "s") (rank 0 routes; calls one at a time)"
        }
        return "\(participantNodes.count - 1) worker\(participantNodes.count == 2 ? "" : "s") + caller, \(executor) executor, \(lanes) dispatch lane\(lanes == 1 ? "" : "s"), "
            + "at most \(maxQueuedCalls) calls queued"
    }

    private func fmt(_ v: Double) -> String { Self.figure(v) }

    /// A figure as the summaries print it: whole above 1000, one decimal above 100, two below.
    static func figure(_ v: Double) -> String {
        guard v.isFinite else { return "-" }
        if abs(v) >= 1000 { return String(Int(v.rounded())) }
        let digits = abs(v) >= 100 ? 1 : 2
        let scale = digits == 1 ? 10.0 : 100.0
        let scaled = Int((abs(v) * scale).rounded())
        let whole = scaled / Int(scale), frac = String(scaled % Int(scale))
        return (v < 0 && scaled != 0 ? "-" : "") + String(whole) + "." + String(repeating: "0", count: digits - frac.count) + frac
    }

    private func mib(_ bytes: Int) -> String { "\(fmt(Double(bytes) / 1_048_576)) MiB" }
}

extension String {
    fileprivate func padding(toLength n: Int) -> String { count >= n ? self + " " : self + String(repeating: " ", count: n - count) }
    fileprivate func leftPadding(toLength n: Int) -> String { count >= n ? " " + self : String(repeating: " ", count: n - count) + self }
}
