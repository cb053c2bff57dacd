import Foundation
import PhatgooseFormats

/// What changed between two runs: reads two run summaries (the JSON that `phatgoose loadtest --format json` and
/// `phatgoose profile` write) and lines up their headline figures, the configuration that differs, the phase costs
/// per layer call, and the experts whose share of tokens moved most.
public struct RunComparison: Sendable {
    /// One figure in both runs.
    public struct Metric: Sendable, Equatable {
        public enum Better: String, Sendable { case higher, lower, neither }
        public var name: String
        public var a: Double
        public var b: Double
        public var better: Better

        /// b - a.
        public var change: Double { b - a }
        /// (b - a) / a, or nil when a is 0.
        public var relativeChange: Double? { a != 0 ? (b - a) / abs(a) : nil }

        /// "better", "worse" or "same" (within `tolerance`, relative).
        public func verdict(tolerance: Double = 0.02) -> String {
            guard better != .neither else { return "" }
            let relative = relativeChange ?? (b == 0 ? 0 : .infinity)
            if abs(relative) <= tolerance || a == b { return "same" }
            return (b > a) == (better == .higher) ? "better" : "worse"
        }
    }

    public var pathA: String
    public var pathB: String
    public var metrics: [Metric]
    /// Configuration fields whose values differ: (field, A, B).
    public var configuration: [(String, String, String)]
    /// Experts whose share of all token assignments moved most: (expert, share in A, share in B).
    public var experts: [(String, Double, Double)]

    /// Headline figures, in order, and which direction is better.
    public static let headline: [(String, Metric.Better)] = [
        ("request_throughput", .higher), ("total_token_throughput", .higher),
        ("mean_e2el_ms", .lower), ("median_e2el_ms", .lower), ("p90_e2el_ms", .lower), ("p99_e2el_ms", .lower), ("p99.9_e2el_ms", .lower),
        ("mean_queue_ms", .lower), ("p99_queue_ms", .lower), ("mean_service_ms", .lower), ("p99_service_ms", .lower),
        ("completed", .neither), ("rejected", .lower), ("failed", .lower),
        ("mean_call_wait_ms", .lower), ("mean_worker_utilisation", .neither),
        ("expert_imbalance_max_over_mean", .lower), ("mean_layer_imbalance_max_over_mean", .lower),
        ("rss_end_bytes", .lower), ("dropped_trace_events", .lower),
    ]
    /// Every field of a run summary that says how the run was set up rather than what it measured, in the order
    /// the comparison lists them: what made the summary, what was served and how, the load, the workload, and how
    /// long it ran (`duration` is the measured window, which differs a little between runs of the same length).
    /// Each one that differs between the runs is listed; a field added to the summary belongs here or among the
    /// measurements (the tests check that every field is one or the other).
    public static let configurationFields = [
        "tool", "format_version",
        "library", "num_layers", "num_experts", "router", "top_k", "sequence_length", "arrow_temperature", "arrow_scaled",
        "workers", "lanes", "executor", "topology", "placement", "memory_cap_bytes", "max_queued_calls",
        "mode", "num_clients", "max_concurrency", "request_rate", "burstiness",
        "decode_fraction", "decode_tokens", "prefill_tokens", "affinity", "skew", "seed",
        "warmup_duration", "requests", "duration", "drain_timeout", "trace_ring_capacity",
    ]

    /// Reads a summary: a JSON file, or a profile directory holding `summary.json`.
    public static func load(_ path: String) throws -> JSONValue {
        var file = path
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue { file = path + "/summary.json" }
        guard let data = FileManager.default.contents(atPath: file) else {
            throw ProfilingError(.io, file: file, "expected a readable run summary, found no such file (or it cannot be read)")
        }
        let bytes = [UInt8](data)
        let value: JSONValue
        do { value = try JSONParser.parse(bytes) } catch {
            throw ProfilingError(.format, file: file, "expected a JSON run summary, found invalid JSON: \(error)")
        }
        guard case .object = value, value["request_throughput"] != nil else {
            throw ProfilingError(.format, file: file, "expected a run summary (an object with \"request_throughput\"), found \(value.kindDescription)")
        }
        return value
    }

    public init(a: JSONValue, b: JSONValue, pathA: String, pathB: String) {
        self.pathA = pathA
        self.pathB = pathB
        func number(_ v: JSONValue?) -> Double? {
            if case let .number(n)? = v { return n.double }
            return nil
        }
        metrics = Self.headline.compactMap { name, better in
            guard let x = number(a[name]), let y = number(b[name]) else { return nil }
            return Metric(name: name, a: x, b: y, better: better)
        }
        // Phase costs per layer call.
        if case let .object(phasesA)? = a["phase_us_per_call"], b["phase_us_per_call"] != nil {
            for (phase, value) in phasesA {
                if let x = number(value), let y = number(b["phase_us_per_call"]?[phase]) {
                    metrics.append(Metric(name: "phase_us_per_call.\(phase)", a: x, b: y, better: .lower))
                }
            }
        }
        func text(_ v: JSONValue?) -> String {
            switch v {
            case nil, .null?: return "-"
            case let .string(s)?: return s
            case let .number(n)?: return n.text
            case let .bool(b)?: return String(b)
            case let v?: return v.serialized()
            }
        }
        configuration = Self.configurationFields.compactMap { field in
            let x = text(a[field]), y = text(b[field])
            return x == y ? nil : (field, x, y)
        }
        func shares(_ v: JSONValue) -> [String: Double] {
            guard case let .array(entries)? = v["tokens_per_expert"] else { return [:] }
            var result: [String: Double] = [:]
            for entry in entries {
                if case let .string(name)? = entry["expert"], let share = number(entry["share"]) { result[name] = share }
            }
            return result
        }
        let sa = shares(a), sb = shares(b)
        experts = Set(sa.keys).union(sb.keys).map { ($0, sa[$0] ?? 0, sb[$0] ?? 0) }
            .sorted { abs($0.2 - $0.1) != abs($1.2 - $1.1) ? abs($0.2 - $0.1) > abs($1.2 - $1.1) : $0.0 < $1.0 }
            .prefix(8).filter { $0.1 != $0.2 }
    }

    /// A readable table.
    public func text() -> String {
        var out = "A: \(pathA)\nB: \(pathB)\n"
        if !configuration.isEmpty {
            out += "\nconfiguration that differs:\n"
            for (field, x, y) in configuration { out += "  \(pad(field, 34)) \(x)  ->  \(y)\n" }
        }
        out += "\n" + pad("metric", 36) + lpad("A", 14) + lpad("B", 14) + lpad("change", 10) + "  verdict\n"
        for m in metrics {
            let change = m.relativeChange.map { (m.change >= 0 ? "+" : "") + formatPercent($0) } ?? (m.change == 0 ? "0%" : "new")
            out += pad(m.name, 36) + lpad(formatNumber(m.a), 14) + lpad(formatNumber(m.b), 14) + lpad(change, 10) + "  " + m.verdict() + "\n"
        }
        if !experts.isEmpty {
            out += "\nexperts whose share of tokens moved most:\n"
            for (name, x, y) in experts {
                out += "  \(pad(name, 34)) \(format2(100 * x))%  ->  \(format2(100 * y))%\n"
            }
        }
        return out
    }

    /// The comparison as JSON.
    public func json() -> JSONValue {
        .object([
            ("a", .string(pathA)), ("b", .string(pathB)),
            ("configuration", .array(configuration.map { .object([("field", .string($0.0)), ("a", .string($0.1)), ("b", .string($0.2))]) })),
            ("metrics", .array(metrics.map { m in
                .object([("name", .string(m.name)), ("a", .double(m.a)), ("b", .double(m.b)), ("change", .double(m.change)),
                         ("relative_change", m.relativeChange.map { .double($0) } ?? .null), ("verdict", .string(m.verdict()))])
            })),
            ("experts", .array(experts.map { .object([("expert", .string($0.0)), ("share_a", .double($0.1)), ("share_b", .double($0.2))]) })),
        ])
    }

    private func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
    private func lpad(_ s: String, _ n: Int) -> String { s.count >= n ? " " + s : String(repeating: " ", count: n - s.count) + s }
    private func formatNumber(_ v: Double) -> String {
        if v == v.rounded() && abs(v) < 1e15 { return String(Int(v)) }
        return abs(v) >= 100 ? format1(v) : format2(v)
    }
    private func formatPercent(_ v: Double) -> String { format1(100 * v) + "%" }
}
