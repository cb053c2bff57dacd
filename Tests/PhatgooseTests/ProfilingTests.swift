import Foundation
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseProfiling
import PhatgooseRuntime
import PhatgooseSynth
import Prometheus
import Testing

/// The exact nearest-rank percentile of sorted values: the smallest value with at least p% of values at or below it.
func nearestRank(_ sorted: [Double], _ p: Double) -> Double {
    sorted[max(0, Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1)]
}

@Suite struct ProfilingStatisticsTests {
    @Test(arguments: [("uniform", UInt64(1)), ("lognormal", UInt64(2))])
    func latencyPercentilesMatchExactRanks(_ distribution: String, _ seed: UInt64) {
        var histogram = LatencyHistogram()
        var values: [Double] = []
        var state = seed
        for i in 0..<20_000 {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            let u = Double(state >> 11) * 0x1p-53
            let micros: UInt64 = distribution == "uniform" ? UInt64(i + 1) : UInt64(1000 * exp(2 * (u - 0.5)) * Double(1 + i % 7))
            histogram.record(microseconds: micros)
            values.append(Double(micros) / 1000)
        }
        values.sort()
        #expect(histogram.count == values.count)
        for p in [50.0, 90, 99, 99.9] {
            let exact = nearestRank(values, p)
            let measured = histogram.milliseconds(atPercentile: p)
            // Three significant digits: within 0.1% (plus one microsecond of rounding).
            #expect(abs(measured - exact) <= exact * 0.001 + 0.001, "p\(p): HdrHistogram \(measured) ms, exact \(exact) ms")
        }
        let mean = values.reduce(0, +) / Double(values.count)
        #expect(abs(histogram.meanMilliseconds - mean) <= mean * 0.001)
        #expect(histogram.maxMilliseconds >= values.last! * 0.999)
        #expect(histogram.cumulativeDistribution().last!.fraction == 1)
        #expect(histogram.logarithmicBuckets(20).reduce(0) { $0 + $1.count } == values.count)
    }

    @Test func nanosecondsRoundUpToMicroseconds() {
        var histogram = LatencyHistogram()
        histogram.record(nanoseconds: 1)
        histogram.record(nanoseconds: 2_500_000)
        #expect(histogram.count == 2)
        #expect(histogram.milliseconds(atPercentile: 0) == 0.001)
        #expect(abs(histogram.maxMilliseconds - 2.5) < 0.003)
    }

    @Test(arguments: [
        ([10, 10, 10, 10], 1.0, 0.0, 0),
        ([40, 0, 0, 0], 4.0, 3.0, 0),
        ([1, 3], 1.5, 0.5, 1),
        ([0, 0, 0], 1.0, 0.0, 0),
        ([], 1.0, 0.0, -1),
    ])
    func imbalance(_ counts: [Int], _ maxOverMean: Double, _ excess: Double, _ argmax: Int) {
        let imbalance = LoadImbalance(counts: counts)
        #expect(abs(imbalance.maxOverMean - maxOverMean) < 1e-12)
        #expect(abs(imbalance.excessOverMean - excess) < 1e-12)
        #expect(imbalance.argmax == argmax)
    }

    @Test func routingTallyCountsCellsAndPairs() {
        var tally = RoutingTally(layers: 2, experts: 4)
        // Three tokens, two slots; the last token has a padding slot.
        let choices: [Int32] = [0, 2, 2, 0, 3, -1]
        choices.withUnsafeBufferPointer { tally.add(layer: 1, choices: $0.baseAddress!, tokens: 3, slots: 2) }
        #expect(tally.count(layer: 1, expert: 0) == 2)
        #expect(tally.count(layer: 1, expert: 2) == 2)
        #expect(tally.count(layer: 1, expert: 3) == 1)
        #expect(tally.count(layer: 0, expert: 0) == 0)
        #expect(tally.pair(0, 2) == 2 && tally.pair(2, 0) == 2)
        #expect(tally.pair(0, 3) == 0 && tally.pair(3, 3) == 0)
        #expect(tally.perExpert == [2, 0, 2, 1])
        #expect(tally.perLayer == [0, 5])
        #expect(tally.decisions == 3)
        var merged = tally
        merged.merge(tally)
        #expect(merged.perExpert == [4, 0, 4, 2] && merged.pair(0, 2) == 4)
    }
}

@Suite struct ProfilingTraceTests {
    func event(_ kind: RuntimeEvent.Kind, worker: Int = 0, layer: Int = 0, expert: Int32 = -1, rows: Int = 4, _ start: UInt64, _ end: UInt64) -> RuntimeEvent {
        RuntimeEvent(kind: kind, worker: worker, node: 0, layer: layer, expert: expert, rows: rows, start: start, end: end)
    }

    @Test func ringHoldsItsCapacityAndCountsDrops() {
        let ring = TraceRecorder(capacity: 100)
        ring.observe(event(.item, 0, 1))
        #expect(ring.written == 0, "events before recording starts are ignored")
        ring.setRecording(true)
        for i in 0..<250 { ring.observe(event(.item, UInt64(i), UInt64(i + 1))) }
        let records = ring.records()
        #expect(records.count == 100)
        #expect(ring.dropped == 150)
        #expect(records.map(\.start) == (150..<250).map { UInt64($0) }, "the ring keeps the newest events, oldest first")
        ring.reset()
        #expect(ring.records().isEmpty && ring.dropped == 0)
    }

    @Test func ringStaysBoundedUnderConcurrentWriters() {
        let ring = TraceRecorder(capacity: 1000)
        ring.setRecording(true)
        DispatchQueue.concurrentPerform(iterations: 4) { w in
            for i in 0..<10_000 { ring.observe(RuntimeEvent(kind: .item, worker: w, node: 0, layer: 0, expert: 1, rows: 1, start: UInt64(i), end: UInt64(i + 1))) }
        }
        #expect(ring.written == 40_000)
        #expect(ring.records().count == 1000)
        #expect(ring.dropped == 39_000)
    }

    /// A call on the caller with its phases, a worker's items, two overlapping queued calls.
    var sampleRecords: [TraceRecord] {
        [
            event(.queued, rows: 4, 0, 5_000), event(.queued, layer: 1, rows: 4, 2_000, 30_000),
            event(.call, rows: 4, 10_000, 30_000),
            event(.routing, rows: 4, 10_000, 12_000), event(.plan, rows: 8, 12_000, 12_500),
            event(.item, expert: 3, rows: 5, 13_000, 20_000), event(.item, worker: 1, expert: 1, rows: 3, 13_500, 18_000),
            event(.steal, worker: 1, expert: 2, rows: 2, 19_000, 21_000),
            event(.combine, rows: 4, 24_000, 29_000),
        ].map(TraceRecord.init)
    }

    @Test func chromeTraceParsesBackWithRequiredFields() throws {
        let context = ChromeTrace.Context(layerNames: ["enc.q", "enc.k"], expertNames: ["e0", "e1", "e2", "e3"], participantNodes: [0, 0],
                                          participantCPUs: [nil, 1], dropped: 7, metadata: [("library", "test \"lib\"")])
        let bytes = ChromeTrace.render(sampleRecords, context: context)
        let document = try JSONParser.parse(bytes)
        guard case let .array(events)? = document["traceEvents"] else { Issue.record("no traceEvents array"); return }
        var phases: [String: Int] = [:], categories: [String: Int] = [:]
        for e in events {
            guard case let .string(ph)? = e["ph"], case .string? = e["name"], case .number? = e["pid"], case .number? = e["tid"] else {
                Issue.record("event without ph, name, pid or tid: \(e.serialized())")
                continue
            }
            phases[ph, default: 0] += 1
            if ph == "X" {
                guard case let .number(ts)? = e["ts"], case let .number(dur)? = e["dur"], case let .string(cat)? = e["cat"] else {
                    Issue.record("complete event without ts, dur or cat: \(e.serialized())")
                    continue
                }
                #expect(ts.double >= 0 && dur.double >= 0)
                categories[cat, default: 0] += 1
            }
            if ph == "C", case let .number(depth)? = e["args"]?["calls waiting"] { #expect(depth.double >= 0 && depth.double <= 2) }
        }
        #expect(categories["item"] == 2 && categories["steal"] == 1 && categories["call"] == 1 && categories["queue"] == 2)
        #expect(categories["routing"] == 1 && categories["plan"] == 1 && categories["combine"] == 1)
        #expect((categories["wait"] ?? 0) >= 2, "idle gaps inside the call are derived as waits")
        #expect((phases["C"] ?? 0) >= 3 && (phases["M"] ?? 0) >= 4)
        let names = events.compactMap { e -> String? in if case let .string(n)? = e["name"] { return n } else { return nil } }
        #expect(names.contains("expert 3") && names.contains("expert 2") && names.contains("enc.q"))
        #expect(document["otherData"]?["dropped_events"] == .integer(7))
        #expect(document["otherData"]?["library"] == .string("test \"lib\""))
    }

    @Test func queueDepthFollowsQueuedSpans() {
        let depth = ChromeTrace.queueDepth(sampleRecords)
        #expect(depth.map(\.depth) == [1, 2, 1, 0])
        #expect(depth.map(\.time) == [0, 2_000, 5_000, 30_000])
    }

    @Test func derivedWaitsFillIdleGapsInsideCalls() {
        let waits = ChromeTrace.derivedWaits(sampleRecords)
        let caller = waits.filter { $0.worker == 0 }.map { ($0.start, $0.end) }
        #expect(caller.count == 1 && caller.contains { $0 == (20_000, 24_000) },
                "gaps of a microsecond or less (12.5 to 13 us, 29 to 30 us) are not waits")
        let worker = waits.filter { $0.worker == 1 }.map { ($0.start, $0.end) }
        #expect(worker.count == 2 && worker.contains { $0 == (10_000, 13_500) } && worker.contains { $0 == (21_000, 30_000) })
    }
}

extension ProfilingTraceTests {
    /// Merged dispatch: call A is chunked over two dispatches (0-30 us, 30-60 us), call B joins the first dispatch
    /// and ends with it, call C joins the second and ends with it (both nest in A), and a call D that joins the
    /// second dispatch and ends in a third overlaps A without nesting.
    var mergedRecords: [TraceRecord] {
        [
            event(.call, rows: 300, 0, 60_000), event(.call, layer: 1, rows: 2, 0, 30_000), event(.call, rows: 2, 30_000, 60_000),
            event(.call, layer: 1, rows: 400, 30_000, 90_000),
            event(.routing, rows: 8, 1_000, 5_000), event(.item, expert: 1, rows: 4, 6_000, 20_000),
            event(.item, worker: 1, expert: 2, rows: 4, 8_000, 25_000),
            event(.routing, rows: 8, 31_000, 35_000), event(.item, worker: 1, expert: 0, rows: 4, 40_000, 55_000),
            event(.routing, rows: 8, 61_000, 65_000), event(.item, worker: 1, expert: 3, rows: 4, 70_000, 85_000),
        ].map(TraceRecord.init)
    }

    /// Renders `records` and checks that every thread's spans nest and every thread with spans is named; returns the
    /// call spans and the thread id of each call span.
    func renderNested(_ records: [TraceRecord], participants: Int) throws -> (calls: Int, callTids: [Double]) {
        let context = ChromeTrace.Context(layerNames: ["enc.q", "enc.k"], expertNames: ["e0", "e1", "e2", "e3"],
                                          participantNodes: [Int](repeating: 0, count: participants),
                                          participantCPUs: [nil] + [Int?](repeating: 1, count: participants - 1), dropped: 0)
        let document = try JSONParser.parse(ChromeTrace.render(records, context: context))
        guard case let .array(events)? = document["traceEvents"] else { Issue.record("no traceEvents array"); return (0, []) }
        var spans: [String: [(Double, Double)]] = [:]
        var named: Set<String> = []
        var callTids: [Double] = []
        for e in events {
            guard case let .string(ph)? = e["ph"], case let .number(pid)? = e["pid"], case let .number(tid)? = e["tid"] else { continue }
            let key = "\(pid.double)/\(tid.double)"
            if ph == "M", e["name"] == .string("thread_name") { named.insert(key) }
            guard ph == "X", case let .number(ts)? = e["ts"], case let .number(dur)? = e["dur"] else { continue }
            if e["cat"] == .string("call") { callTids.append(tid.double) }
            spans[key, default: []].append((ts.double, ts.double + dur.double))
        }
        for (key, list) in spans {
            #expect(named.contains(key), "thread \(key) has spans but no name")
            var stack: [Double] = []
            for (start, end) in list.sorted(by: { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 > $1.1 }) {
                while let top = stack.last, top <= start { stack.removeLast() }
                #expect(stack.last.map { end <= $0 } ?? true, "thread \(key): span \(start)-\(end) overlaps its enclosing span")
                stack.append(end)
            }
        }
        return (callTids.count, callTids)
    }

    @Test func overlappingCallsOfAMergedDispatchStillNestPerThread() throws {
        let (calls, _) = try renderNested(mergedRecords, participants: 2)
        #expect(calls == 4, "every call is in the trace")
        let waits = ChromeTrace.derivedWaits(mergedRecords).filter { $0.worker == 1 }.sorted { $0.start < $1.start }
        for (a, b) in zip(waits, waits.dropFirst()) { #expect(a.end <= b.start, "waits \(a.start)-\(a.end) and \(b.start)-\(b.end) overlap") }
        #expect(waits.first.map { ($0.start, $0.end) } ?? (0, 0) == (0, 8_000))
        #expect(waits.last.map { ($0.start, $0.end) } ?? (0, 0) == (85_000, 90_000))
    }

    /// Two dispatch lanes (participant 2 is lane 1's holder). Call A runs on lane 1 (0-40 us); call C's first chunk
    /// ran on lane 0 (its item on participant 0 at 2-20 us) and its last on lane 1, which reported it (1-35 us, in A).
    /// Call B started on lane 1 and lane 0 completed it: its span, reported by participant 0, starts at 5 us, while
    /// participant 0 is inside C's item; no other call of participant 0 overlaps it.
    var laneRecords: [TraceRecord] {
        [
            event(.call, worker: 2, rows: 4, 0, 40_000), event(.routing, worker: 2, rows: 4, 1_000, 3_000),
            event(.item, worker: 2, expert: 1, rows: 4, 4_000, 30_000), event(.call, worker: 2, layer: 1, rows: 2, 1_000, 35_000),
            event(.item, worker: 0, expert: 0, rows: 2, 2_000, 20_000),
            event(.call, worker: 0, rows: 300, 5_000, 60_000), event(.item, worker: 0, expert: 2, rows: 300, 25_000, 59_000),
        ].map(TraceRecord.init)
    }

    @Test func callsThatCrossDispatchLanesGoOnACallLane() throws {
        let (calls, tids) = try renderNested(laneRecords, participants: 2)
        #expect(calls == 3, "every call is in the trace")
        // A and C nest on participant 2's thread; B would cut through C's item on participant 0's and goes to a call lane.
        #expect(tids.sorted() == [2, 2, 2000], "call threads \(tids)")
    }
}

@Suite struct ProfilingReportTests {
    func sampleReport() -> HTMLReport {
        var tally = RoutingTally(layers: 3, experts: 4)
        let choices: [Int32] = [0, 1, 0, 2, 1, 3, 0, 1]
        for l in 0..<3 { choices.withUnsafeBufferPointer { tally.add(layer: l, choices: $0.baseAddress!, tokens: 4, slots: 2) } }
        var latency = LatencyHistogram()
        for ms in [3, 5, 8, 13, 21, 34, 55] { latency.record(microseconds: UInt64(ms * 1000)) }
        var phases = PhaseTotals(participants: 2, layers: 3)
        phases.participants[0].nanoseconds[PhaseTotals.kindIndex(.item)] = 4_000_000
        phases.participants[1].nanoseconds[PhaseTotals.kindIndex(.routing)] = 2_000_000
        phases.layers[0].calls = 10
        let trace = [TraceRecord(kind: .call, worker: 0, node: 0, layer: 0, expert: -1, rows: 4, start: 0, end: 1_000_000),
                     TraceRecord(kind: .item, worker: 1, node: 0, layer: 0, expert: 2, rows: 4, start: 100_000, end: 600_000)]
        return HTMLReport(title: "test <run>", facts: [("load", "closed loop")], layerNames: ["a", "b", "c"], expertNames: ["w", "x", "y", "z"],
                          candidates: [[0, 1, 2, 3], [0, 1, 2], [0, 1, 2, 3]], tally: tally, latency: latency, phases: phases,
                          wallNanoseconds: 10_000_000, participantNodes: [0, 0], participantCPUs: [nil, 1], trace: trace, droppedEvents: 3)
    }

    @Test func htmlHasEverySVGSectionAndNoScripts() {
        let html = sampleReport().render()
        for section in HTMLReport.sections {
            #expect(html.contains("<svg id=\"\(section)\""), "missing plot \(section)")
            #expect(html.contains("<section id=\"section-\(section)\""))
        }
        #expect(!html.contains("<script"))
        #expect(html.contains("test &lt;run&gt;"), "titles are escaped")
        #expect(html.contains("3 older events were dropped"))
        #expect(html.hasPrefix("<!DOCTYPE html>") && html.hasSuffix("</html>\n"))
    }

    /// The CDF's percentile labels as boxes: each accent-coloured `<text>` of the `latency-cdf` plot, its width at
    /// 0.6 em per character and its height from 0.75 em above the baseline to 0.25 em below (about what a sans-serif
    /// font draws), independently of how the report lays them out.
    func cdfLabelBoxes(_ html: String) throws -> [(text: String, left: Double, right: Double, top: Double, bottom: Double)] {
        let start = try #require(html.range(of: "<svg id=\"latency-cdf\""))
        let svg = html[start.lowerBound...].prefix { $0 != "\n" }
        let pattern = /<text x="([-0-9.]+)" y="([-0-9.]+)" font-size="([0-9.]+)" text-anchor="(start|middle|end)" fill="#c0392b">([^<]*)<\/text>/
        return svg.matches(of: pattern).map { match in
            let x = Double(match.1)!, y = Double(match.2)!, size = Double(match.3)!, text = String(match.5)
            let width = Double(text.count) * size * 0.6
            let left = match.4 == "end" ? x - width : match.4 == "middle" ? x - width / 2 : x
            return (text, left, left + width, y - 0.75 * size, y + 0.25 * size)
        }
    }

    @Test("the CDF's percentile labels never overlap, however close the percentiles",
          arguments: [[Int](repeating: 10_000, count: 1000),                                      // every percentile the same
                      [Int](repeating: 10_000, count: 990) + [Int](repeating: 10_200, count: 10),  // p99 and p99.9 close
                      (1...1000).map { 1000 + $0 },                                               // close, not equal
                      (1...1000).map { Int(1000 * pow(1.01, Double($0))) }])                      // far apart
    func cdfLabelsDoNotOverlap(_ microseconds: [Int]) throws {
        var report = sampleReport()
        report.latency = LatencyHistogram()
        for value in microseconds { report.latency.record(microseconds: UInt64(value)) }
        let boxes = try cdfLabelBoxes(report.render())
        #expect(boxes.map { $0.text.split(separator: " ")[0] } == ["p50", "p90", "p99", "p99.9"])
        for (i, a) in boxes.enumerated() {
            #expect(a.left >= 0 && a.right <= 900 && a.top >= 0 && a.bottom <= 300, "\(a.text) leaves the plot")
            for b in boxes[(i + 1)...] {
                let overlap = a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom
                #expect(!overlap, "\(a.text) overlaps \(b.text)")
            }
        }
    }

    @Test func imbalanceRankingUsesCandidatesOnly() {
        let ranking = sampleReport().imbalanceRanking()
        // Layer b has 3 candidates: counts of experts 0, 1, 2 are 3, 3, 1 (expert 3 is not a candidate).
        let b = ranking.first { $0.layer == 1 }!
        #expect(b.imbalance.bins == 3 && b.imbalance.total == 7)
        #expect(abs(b.imbalance.maxOverMean - 3 / (7.0 / 3)) < 1e-12)
    }

    @Test func csvListsCandidatesWithShares() {
        let report = sampleReport()
        let csv = ExpertCountsCSV.render(report.tally, layerNames: report.layerNames, expertNames: report.expertNames, candidates: report.candidates)
        let lines = csv.split(separator: "\n")
        #expect(lines.first == "layer_index,layer,expert_index,expert,tokens,share_of_layer")
        #expect(lines.count == 1 + 4 + 3 + 4)
        #expect(lines.contains("1,b,0,w,3,0.428571"))
        #expect(!lines.contains { $0.hasPrefix("1,b,3,") }, "non-candidates are not listed")
    }
}

@Suite struct ProfilingComparisonTests {
    @Test func comparisonJudgesDirectionAndConfiguration() throws {
        let a = try JSONParser.parse(Array(#"{"mode":"closed","num_clients":4,"request_throughput":10,"p99_e2el_ms":100,"rejected":0,"tokens_per_expert":[{"expert":"e0","share":0.5},{"expert":"e1","share":0.5}],"phase_us_per_call":{"item":40}}"#.utf8))
        let b = try JSONParser.parse(Array(#"{"mode":"closed","num_clients":8,"request_throughput":12,"p99_e2el_ms":150,"rejected":0,"tokens_per_expert":[{"expert":"e0","share":0.7},{"expert":"e1","share":0.3}],"phase_us_per_call":{"item":40.1}}"#.utf8))
        let comparison = RunComparison(a: a, b: b, pathA: "A", pathB: "B")
        let byName = Dictionary(uniqueKeysWithValues: comparison.metrics.map { ($0.name, $0) })
        #expect(byName["request_throughput"]?.verdict() == "better")
        #expect(byName["p99_e2el_ms"]?.verdict() == "worse")
        #expect(byName["rejected"]?.verdict() == "same")
        #expect(byName["phase_us_per_call.item"]?.verdict() == "same")
        #expect(comparison.configuration.count == 1 && comparison.configuration[0].0 == "num_clients")
        #expect(comparison.experts.first?.0 == "e0" || comparison.experts.first?.0 == "e1")
        #expect(comparison.text().contains("request_throughput"))
    }

    @Test("every configuration field that differs is listed, the measured duration included")
    func comparisonListsEveryConfigurationDifference() throws {
        let a = try JSONParser.parse(Array(#"""
            {"tool":"phatgoose profile","library":"lib","router":"phatgoose","top_k":2,"sequence_length":null,"workers":1,"executor":"pinned",
             "placement":"distribute","mode":"closed","num_clients":4,"decode_tokens":[1,16],"affinity":0.35,"seed":0,"warmup_duration":3,
             "requests":null,"duration":10.0012,"drain_timeout":10,"trace_ring_capacity":262144,"request_throughput":10,"completed":100}
            """#.utf8))
        let b = try JSONParser.parse(Array(#"""
            {"tool":"phatgoose loadtest","library":"lib","router":"arrow","top_k":2,"sequence_length":16,"workers":1,"executor":"dispatch",
             "placement":"isolate:0","mode":"closed","num_clients":4,"decode_tokens":[1,8],"affinity":0.35,"seed":0,"warmup_duration":1,
             "requests":null,"duration":10.0034,"drain_timeout":10,"request_throughput":10,"completed":120}
            """#.utf8))
        let comparison = RunComparison(a: a, b: b, pathA: "A", pathB: "B")
        let expected = [("tool", "phatgoose profile", "phatgoose loadtest"), ("router", "phatgoose", "arrow"), ("sequence_length", "-", "16"),
                        ("executor", "pinned", "dispatch"), ("placement", "distribute", "isolate:0"), ("decode_tokens", "[1,16]", "[1,8]"),
                        ("warmup_duration", "3", "1"), ("duration", "10.0012", "10.0034"), ("trace_ring_capacity", "262144", "-")]
        #expect(comparison.configuration.map(\.0) == expected.map(\.0), "in order, and nothing that is the same in both")
        let text = comparison.text()
        for (field, x, y) in expected {
            #expect(comparison.configuration.contains { $0 == (field, x, y) }, "\(field): \(x) -> \(y)")
            #expect(text.split(separator: "\n").contains { $0.hasPrefix("  \(field) ") && $0.hasSuffix("\(x)  ->  \(y)") }, "the text lists \(field)")
        }
        guard case let .array(listed)? = comparison.json()["configuration"] else { Issue.record("no configuration in the JSON"); return }
        #expect(listed.compactMap { if case let .string(field)? = $0["field"] { return field } else { return nil } } == expected.map(\.0))
    }

    @Test func loadRefusesWhatIsNotASummary() throws {
        let directory = TemporaryDirectory()
        writeText("{\"x\":1}", to: directory.file("summary.json"))
        let notSummary = #expect(throws: ProfilingError.self) { try RunComparison.load(directory.path) }
        #expect(notSummary?.code == .format && notSummary?.file == directory.file("summary.json"))
        #expect(notSummary?.message == "expected a run summary (an object with \"request_throughput\"), found an object")
        let missing = #expect(throws: ProfilingError.self) { try RunComparison.load(directory.file("missing.json")) }
        #expect(missing?.code == .io && missing?.file == directory.file("missing.json"))
        writeText("{\"request_throughput\":1}", to: directory.file("summary.json"))
        #expect(try RunComparison.load(directory.path)["request_throughput"] != nil)
    }
}

@Suite struct ProfilingMetricsTests {
    @Test func runtimeMetricsExportPrometheusText() throws {
        let registry = PrometheusCollectorRegistry()
        let library = try Synth.library(SynthOptions(shape: ModelShape.presets["tiny"]!, experts: 3, rank: 4, seed: 3))
        let metrics = RuntimeMetrics(factory: PrometheusMetricsFactory(registry: registry), expertNames: library.experts.map(\.name))
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1, observer: metrics))
        defer { runtime.shutdown() }
        let module = library.modules[0]
        let layer = runtime.layer(named: module.name)!
        for _ in 0..<3 { _ = try runtime.apply(layer, input: [Float](repeating: 0.5, count: 4 * module.inWidth), tokens: 4) }
        metrics.sample(runtime.statisticsSnapshot(), queueDepth: 2)
        let text = registry.emitToString()
        #expect(text.contains("phatgoose_calls_total 3"))
        #expect(text.contains("phatgoose_tokens_total 12"))
        #expect(text.contains("phatgoose_rejected_calls_total 0"))
        #expect(text.contains("phatgoose_queue_depth 2"))
        #expect(text.contains("phatgoose_expert_tokens_total{expert=\"\(library.experts[0].name)\"}"))
        #expect(text.contains("phatgoose_call_duration_seconds_count 3"))
        #expect(text.contains("phatgoose_busy_workers"))
        // A second sample adds only what changed.
        _ = try runtime.apply(layer, input: [Float](repeating: 0.5, count: 2 * module.inWidth), tokens: 2)
        metrics.sample(runtime.statisticsSnapshot(), queueDepth: 0)
        #expect(registry.emitToString().contains("phatgoose_calls_total 4"))
    }

    @Test func accountingSumsByParticipantAndLayer() {
        let accounting = PhaseAccounting(participants: 2, layers: 2)
        accounting.observe(RuntimeEvent(kind: .item, worker: 1, node: 0, layer: 1, expert: 0, rows: 7, start: 100, end: 400))
        accounting.observe(RuntimeEvent(kind: .call, worker: 0, node: 0, layer: 1, expert: -1, rows: 9, start: 0, end: 1000))
        accounting.observe(RuntimeEvent(kind: .queued, worker: 0, node: 0, layer: 1, expert: -1, rows: 9, start: 0, end: 50))
        accounting.observe(RuntimeEvent(kind: .item, worker: 5, node: 0, layer: 1, expert: 0, rows: 7, start: 100, end: 400))
        let before = accounting.snapshot()
        #expect(before.participants[1][.item] == 300 && before.participants[1].itemRows == 7 && before.participants[1].busyNanoseconds == 300)
        #expect(before.layers[1].calls == 1 && before.layers[1].tokens == 9 && before.layers[1].nanoseconds == 1000)
        #expect(before.queuedCalls == 1 && before.queuedNanoseconds == 50)
        accounting.observe(RuntimeEvent(kind: .routing, worker: 0, node: 0, layer: 0, expert: -1, rows: 9, start: 0, end: 20))
        let window = accounting.snapshot().subtracting(before)
        #expect(window.participants[0].busyNanoseconds == 20 && window.participants[1].busyNanoseconds == 0 && window.calls == 0)
    }
}
