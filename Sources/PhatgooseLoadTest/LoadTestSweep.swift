import PhatgooseFormats

/// The client counts of `--clients`: one count, or a comma-separated list of them for a sweep.
public enum ClientCounts {
    /// The most clients a closed loop runs.
    public static let maximum = 4096

    /// Parses `text` ("4", "1,2,4,8,16"; blanks around an item are ignored). Throws `LoadTestError(.option)` naming
    /// `--clients`, what was expected and what was found: an empty item, an item that is not a whole number, a count
    /// outside 1 to 4096, or a count given twice. A single count out of range gets the closed loop's own message.
    public static func parse(_ text: String) throws -> [Int] {
        func bad(_ message: String) -> LoadTestError { LoadTestError(.option, "--clients: " + message) }
        let items = text.split(separator: ",", omittingEmptySubsequences: false).map { $0.trimmingBlanks() }
        let list = items.count > 1
        var counts: [Int] = []
        for (position, item) in items.enumerated() {
            guard !item.isEmpty else {
                throw bad(list ? "expected a comma-separated list of client counts (such as 1,2,4,8,16), found an empty item at position \(position + 1) in \"\(text)\""
                               : "expected a client count, or a comma-separated list of them (such as 1,2,4,8,16), found nothing")
            }
            guard let count = Int(item) else {
                throw bad("expected " + (list ? "every item to be " : "") + "a whole number of clients from 1 to \(maximum), found \"\(item)\"" + (list ? " in \"\(text)\"" : ""))
            }
            guard count >= 1 && count <= maximum else {
                throw bad("expected 1 to \(maximum), found \(count)" + (list ? " in \"\(text)\"" : ""))
            }
            guard !counts.contains(count) else {
                throw bad("expected distinct client counts, found \(count) twice in \"\(text)\"")
            }
            counts.append(count)
        }
        return counts
    }
}

extension Substring {
    fileprivate func trimmingBlanks() -> Substring {
        var s = self
        while let first = s.first, first == " " || first == "\t" { s.removeFirst() }
        while let last = s.last, last == " " || last == "\t" { s.removeLast() }
        return s
    }
}

/// A client sweep: closed-loop measurements at several client counts on one runtime, repeated over rounds.
///
/// Round r measures every count, forward in odd rounds and backward in even ones (1, 2, 4 then 4, 2, 1), so a drift
/// of the host over the run (heat, a neighbour's load) falls on every count alike instead of on the last ones. Each
/// measurement is a whole ``LoadTest`` run with its own warm-up; ``LoadTestSweepResult`` reports per count the
/// median over rounds and the throughput relative to the baseline count.
public struct LoadTestSweep: Sendable {
    public let clientCounts: [Int]
    public let rounds: Int

    /// The most rounds a sweep runs.
    public static let maximumRounds = 1000

    /// Throws `LoadTestError(.option)` for an empty list, a count outside 1 to 4096, a count given twice, or rounds
    /// outside 1 to 1000.
    public init(clientCounts: [Int], rounds: Int = 2) throws {
        guard !clientCounts.isEmpty else { throw LoadTestError(.option, "--clients: expected at least one client count, found none") }
        _ = try ClientCounts.parse(clientCounts.map(String.init).joined(separator: ","))
        guard rounds >= 1 && rounds <= Self.maximumRounds else {
            throw LoadTestError(.option, "--rounds: expected 1 to \(Self.maximumRounds), found \(rounds)")
        }
        self.clientCounts = clientCounts
        self.rounds = rounds
    }

    /// The measurements in the order they run.
    public var schedule: [(round: Int, clients: Int)] {
        (1...rounds).flatMap { round in (round % 2 == 1 ? clientCounts : clientCounts.reversed()).map { (round, $0) } }
    }

    /// The count the others are compared with: 1 client when the list has it, else the first count.
    public var baselineClients: Int { clientCounts.contains(1) ? 1 : clientCounts[0] }

    /// Runs the sweep on `test`'s runtime: each measurement is `test.run(loop: .closed(clients:))`.
    public func run(_ test: LoadTest) throws -> LoadTestSweepResult {
        try run { _, clients in try test.run(loop: .closed(clients: clients)) }
    }

    /// Runs the sweep, `measure(round, clients)` making each measurement (a closed-loop run of that many clients),
    /// in ``schedule`` order.
    public func run(_ measure: (_ round: Int, _ clients: Int) throws -> LoadTestResult) throws -> LoadTestSweepResult {
        var measurements: [LoadTestSweepResult.Measurement] = []
        var configuration: LoadTestResult? = nil
        for (position, step) in schedule.enumerated() {
            let result = try measure(step.round, step.clients)
            guard case .closed(step.clients) = result.options.loop else {
                throw LoadTestError(.option, "sweep: expected a closed loop of \(step.clients) clients, found a measurement of another loop")
            }
            if configuration == nil { configuration = result }
            measurements.append(LoadTestSweepResult.Measurement(result, round: step.round, position: position + 1))
        }
        return LoadTestSweepResult(clientCounts: clientCounts, rounds: rounds, baselineClients: baselineClients,
                                   measurements: measurements, configuration: configuration!)
    }
}

/// What a client sweep measured: per count the median over rounds, and every measurement. ``json()`` and ``text()``
/// are defined in `docs/loadtest.md`.
public struct LoadTestSweepResult: Sendable {
    /// One measurement: a closed loop of `clients` clients in round `round`.
    public struct Measurement: Sendable {
        public var round: Int
        /// Where the measurement came in the run (1 first).
        public var position: Int
        public var clients: Int
        /// Length of the measured window, in seconds.
        public var windowSeconds: Double
        public var completed: Int
        public var tokenThroughput: Double
        public var requestThroughput: Double
        /// End-to-end latency percentiles in ms (NaN without a completed request).
        public var p50Milliseconds: Double
        public var p90Milliseconds: Double
        public var p99Milliseconds: Double
        public var rejected: Int
        public var failed: Int
        public var unfinished: Int
        public var firstFailure: String?
        /// The most resident memory seen during the measurement.
        public var residentBytesMax: Int

        /// Measured requests that did not complete: rejected, failed or unfinished.
        public var errors: Int { rejected + failed + unfinished }

        public init(_ result: LoadTestResult, round: Int, position: Int) {
            self.round = round
            self.position = position
            if case let .closed(clients) = result.options.loop { self.clients = clients } else { clients = 0 }
            windowSeconds = result.windowSeconds
            completed = result.completed
            tokenThroughput = result.tokenThroughput
            requestThroughput = result.requestThroughput
            let e2el = result.e2el
            p50Milliseconds = e2el.isEmpty ? .nan : e2el.medianMilliseconds
            p90Milliseconds = e2el.isEmpty ? .nan : e2el.milliseconds(atPercentile: 90)
            p99Milliseconds = e2el.isEmpty ? .nan : e2el.milliseconds(atPercentile: 99)
            rejected = result.rejected
            failed = result.failed
            unfinished = result.unfinished
            firstFailure = result.firstFailure
            residentBytesMax = result.residentBytesMax
        }
    }

    /// One client count: medians over its rounds.
    public struct Row: Sendable {
        public var clients: Int
        /// Its measurements, by round.
        public var measurements: [Measurement]
        public var tokenThroughput: Double
        public var requestThroughput: Double
        public var p50Milliseconds: Double
        public var p90Milliseconds: Double
        public var p99Milliseconds: Double
        /// Median token throughput over the baseline count's (NaN when the baseline's is 0).
        public var throughputRatio: Double
        /// Summed over rounds.
        public var rejected: Int
        public var failed: Int
        public var unfinished: Int
        public var errors: Int { rejected + failed + unfinished }
        /// The most over rounds.
        public var residentBytesMax: Int
    }

    public var clientCounts: [Int]
    public var rounds: Int
    public var baselineClients: Int
    /// Every measurement, in the order they ran.
    public var measurements: [Measurement]
    /// The first measurement: what every measurement shares (library, routing, runtime, workload, windows) comes
    /// from it.
    public var configuration: LoadTestResult
    /// Seconds spent generating the built-in library in this run, if it was.
    public var generatedLibrarySeconds: Double? = nil

    /// The median of the finite values (the mean of the middle two for an even count); NaN without one.
    public static func median(_ values: [Double]) -> Double {
        let sorted = values.filter(\.isFinite).sorted()
        guard !sorted.isEmpty else { return .nan }
        let mid = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
    }

    /// One row per client count, in the order of `clientCounts`.
    public var rows: [Row] {
        var rows = clientCounts.map { clients in
            let mine = measurements.filter { $0.clients == clients }.sorted { $0.round < $1.round }
            return Row(clients: clients, measurements: mine, tokenThroughput: Self.median(mine.map(\.tokenThroughput)),
                       requestThroughput: Self.median(mine.map(\.requestThroughput)), p50Milliseconds: Self.median(mine.map(\.p50Milliseconds)),
                       p90Milliseconds: Self.median(mine.map(\.p90Milliseconds)), p99Milliseconds: Self.median(mine.map(\.p99Milliseconds)),
                       throughputRatio: .nan, rejected: mine.reduce(0) { $0 + $1.rejected }, failed: mine.reduce(0) { $0 + $1.failed },
                       unfinished: mine.reduce(0) { $0 + $1.unfinished }, residentBytesMax: mine.map(\.residentBytesMax).max() ?? 0)
        }
        let base = rows.first { $0.clients == baselineClients }?.tokenThroughput ?? .nan
        for i in rows.indices { rows[i].throughputRatio = base > 0 ? rows[i].tokenThroughput / base : .nan }
        return rows
    }

    /// Failed measured requests over the whole sweep, and the first failure's message.
    public var failed: Int { measurements.reduce(0) { $0 + $1.failed } }
    public var firstFailure: String? { measurements.lazy.compactMap(\.firstFailure).first }

    /// The order of each round.
    var roundOrders: [[Int]] {
        (1...rounds).map { round in measurements.filter { $0.round == round }.sorted { $0.position < $1.position }.map(\.clients) }
    }

    // MARK: JSON

    public func json() -> JSONValue {
        func num(_ v: Double) -> JSONValue { v.isFinite ? .double(v) : .null }
        let options = configuration.options
        var fields: [(String, JSONValue)] = [("tool", .string("phatgoose loadtest")), ("format_version", .integer(1))]
        fields += configuration.servedFields()
        fields += [
            ("mode", .string("closed_sweep")), ("client_counts", .array(clientCounts.map { .integer($0) })), ("rounds", .integer(rounds)),
            ("round_orders", .array(roundOrders.map { .array($0.map { .integer($0) }) })), ("baseline_clients", .integer(baselineClients)),
        ]
        fields += configuration.workloadFields()
        fields += [
            ("warmup_duration", num(options.warmup)), ("duration", options.duration.map(num) ?? .null),
            ("requests", options.requests.map { .integer($0) } ?? .null), ("drain_timeout", num(options.drainTimeout)),
            ("failed", .integer(failed)), ("first_error", firstFailure.map { .string($0) } ?? .null),
        ]
        fields.append(("rows", .array(rows.map { row in
            .object([
                ("num_clients", .integer(row.clients)),
                ("total_token_throughput", num(row.tokenThroughput)), ("request_throughput", num(row.requestThroughput)),
                ("throughput_ratio", num(row.throughputRatio)),
                ("median_e2el_ms", num(row.p50Milliseconds)), ("p90_e2el_ms", num(row.p90Milliseconds)), ("p99_e2el_ms", num(row.p99Milliseconds)),
                ("errors", .integer(row.errors)), ("rejected", .integer(row.rejected)), ("failed", .integer(row.failed)),
                ("unfinished", .integer(row.unfinished)), ("rss_max_bytes", .integer(row.residentBytesMax)),
                ("rounds", .array(row.measurements.map { m in
                    .object([
                        ("round", .integer(m.round)), ("position", .integer(m.position)), ("duration", num(m.windowSeconds)),
                        ("completed", .integer(m.completed)),
                        ("total_token_throughput", num(m.tokenThroughput)), ("request_throughput", num(m.requestThroughput)),
                        ("median_e2el_ms", num(m.p50Milliseconds)), ("p90_e2el_ms", num(m.p90Milliseconds)), ("p99_e2el_ms", num(m.p99Milliseconds)),
                        ("errors", .integer(m.errors)), ("rejected", .integer(m.rejected)), ("failed", .integer(m.failed)),
                        ("unfinished", .integer(m.unfinished)), ("rss_max_bytes", .integer(m.residentBytesMax)),
                    ])
                })),
            ])
        })))
        if let generatedLibrarySeconds { fields.append(("library_generation_seconds", num(generatedLibrarySeconds))) }
        return .object(fields)
    }

    // MARK: Text

    public func text() -> String {
        let fmt = LoadTestResult.figure
        let c = configuration, options = c.options
        var out = "============ Phatgoose load test: client sweep ============\n"
        func line(_ key: String, _ value: String) { out += key + String(repeating: " ", count: max(1, 36 - key.count)) + value + "\n" }
        line("Library:", c.libraryDescription)
        line("Routing:", c.routingSummary)
        let orders = roundOrders.prefix(2).map { $0.map(String.init).joined(separator: " ") }
        line("Load:", "closed loop, \(clientCounts.map(String.init).joined(separator: ", ")) clients; \(rounds) round\(rounds == 1 ? "" : "s")"
             + (rounds > 1 ? ", alternating (\(orders.joined(separator: ", then ")))" : ""))
        line("Requests:", c.requestsSummary)
        line("Runtime:", c.runtimeSummary + ", one runtime for the sweep")
        let span = options.duration.map { "\(fmt($0)) s" } ?? "\(options.requests ?? 0) requests"
        line("Measured:", "\(span) per count and round, each after \(fmt(options.warmup)) s of warm-up")
        out += "-----------------------------------------------------------\n"
        let headers = ["clients", "tok/s", "vs \(baselineClients)", "req/s", "p50 ms", "p99 ms", "errors", "RSS MiB"]
        let widths = [7, 10, 7, 9, 9, 9, 8, 9]
        func cells(_ values: [String]) -> String {
            zip(values, widths).map { value, width in String(repeating: " ", count: max(1, width - value.count)) + value }.joined()
        }
        out += cells(headers) + "   tok/s by round\n"
        for row in rows {
            let ratio = row.throughputRatio.isFinite ? format2(row.throughputRatio) : "-"
            out += cells([String(row.clients), fmt(row.tokenThroughput), ratio, fmt(row.requestThroughput), fmt(row.p50Milliseconds),
                          fmt(row.p99Milliseconds), String(row.errors), fmt(Double(row.residentBytesMax) / 1_048_576)])
                + "   " + row.measurements.map { fmt($0.tokenThroughput) }.joined(separator: ", ") + "\n"
        }
        out += "-----------------------------------------------------------\n"
        out += "Figures are medians over rounds; errors (rejected, failed, unfinished) are summed and RSS is the most seen.\n"
        out += "vs \(baselineClients): median tok/s over the \(baselineClients)-client median.\n"
        if let first = firstFailure { out += "First failure: \(first)\n" }
        out += "===========================================================\n"
        return out
    }

    /// A ratio with two decimals.
    private func format2(_ v: Double) -> String {
        let scaled = Int((v * 100).rounded())
        let frac = String(scaled % 100)
        return "\(scaled / 100)." + String(repeating: "0", count: 2 - frac.count) + frac
    }
}
