import PhatgooseFormats
import PhatgooseRuntime

/// Writes runtime events as Chrome trace-event JSON (the "JSON Object Format" that Perfetto and chrome://tracing
/// open): one process per NUMA node (`pid` = node), one thread per participant (`tid` = participant, 0 the caller).
///
/// - Complete events (`"ph":"X"`) for routing, plan, every work item (named after its expert, `"expert 12"`; category
///   `item`, or `steal` when taken from another participant's queue), combine, and each whole layer call (named
///   after the layer, category `call`, enclosing the caller's phases).
/// - `wait` spans: when the runtime reports none of its own, each participant's idle gaps inside a layer call (the
///   caller waiting at a join, a worker with nothing left to run) are derived from the other spans.
/// - Calls merged into one dispatch can overlap without nesting (a chunked call runs on across dispatches): such a
///   call span goes on a lane of its own (`tid` 2000 and up), and waits are derived over the union of the calls.
/// - Queueing for the executor as `queued` spans on lanes of their own (`tid` 1000 and up; waiting calls overlap, and
///   spans on one thread must nest), and a counter track `queue depth` with the number of calls waiting.
/// - Metadata names every process and thread; `otherData` carries the drop count and anything the caller adds.
///
/// Timestamps are microseconds from the earliest event, with nanosecond precision (three decimals).
public enum ChromeTrace {
    /// What the writer needs besides the events.
    public struct Context: Sendable {
        public var layerNames: [String]
        public var expertNames: [String]
        /// Node and CPU of each participant (index = participant).
        public var participantNodes: [Int]
        public var participantCPUs: [Int?]
        /// Events the ring overwrote.
        public var dropped: Int
        /// Extra `otherData` entries (strings).
        public var metadata: [(String, String)]

        public init(layerNames: [String], expertNames: [String], participantNodes: [Int], participantCPUs: [Int?], dropped: Int,
                    metadata: [(String, String)] = []) {
            self.layerNames = layerNames
            self.expertNames = expertNames
            self.participantNodes = participantNodes
            self.participantCPUs = participantCPUs
            self.dropped = dropped
            self.metadata = metadata
        }
    }

    /// The first thread id of the queue lanes.
    public static let queueLaneBase = 1000
    /// The first thread id of the lanes for call spans that overlap others without nesting.
    public static let callLaneBase = 2000

    /// Writes the trace to `path` atomically.
    public static func write(_ records: [TraceRecord], context: Context, to path: String) throws {
        let file = try AtomicFile(path: path)
        var sink = Sink(file: file)
        try render(records, context: context, into: &sink)
        try sink.flush()
        try file.commit()
    }

    /// The trace as bytes (for tests and small traces).
    public static func render(_ records: [TraceRecord], context: Context) -> [UInt8] {
        var sink = Sink(file: nil)
        try! render(records, context: context, into: &sink)
        return sink.bytes
    }

    /// Idle gaps of each participant inside each layer call (see the type's documentation), longer than
    /// `minimumNanoseconds`.
    public static func derivedWaits(_ records: [TraceRecord], minimumNanoseconds: UInt64 = 1000) -> [TraceRecord] {
        // Calls merged into one dispatch overlap (a chunked call spans several dispatches): the windows are the
        // pieces of the union of the call spans between consecutive call starts and ends, so no idle gap is counted
        // twice and none crosses a call's boundary.
        var edges: [(time: UInt64, delta: Int, index: Int)] = []
        for (i, r) in records.enumerated() where r.kind == .call {
            edges.append((r.start, 1, i))
            edges.append((r.end, -1, i))
        }
        edges.sort { $0.time < $1.time }
        var calls: [TraceRecord] = []
        var active = 0, from: UInt64 = 0, latest = 0
        for edge in edges {
            if active > 0 && edge.time > from {
                var window = records[latest]
                window.start = from
                window.end = edge.time
                calls.append(window)
            }
            active += edge.delta
            from = edge.time
            if edge.delta > 0 { latest = edge.index }
        }
        guard !calls.isEmpty else { return [] }
        var byWorker: [Int: [TraceRecord]] = [:]
        for r in records where PhaseTotals.busyKinds.contains(r.kind) { byWorker[Int(r.worker), default: []].append(r) }
        // Participants seen anywhere take part in every call (every phase fans out to all of them).
        var participants = Set(byWorker.keys)
        participants.insert(0)
        var waits: [TraceRecord] = []
        for p in participants.sorted() {
            let spans = (byWorker[p] ?? []).sorted { $0.start < $1.start }
            let node = spans.first.map { Int($0.node) } ?? Int(calls[0].node)
            var i = 0
            var reach: UInt64 = 0  // the latest end of the spans seen so far (one may run on into the next window)
            for call in calls {
                while i < spans.count && spans[i].start < call.start { reach = max(reach, spans[i].end); i += 1 }
                var cursor = max(call.start, reach)
                var j = i
                while j < spans.count && spans[j].start < call.end {
                    if spans[j].start > cursor + minimumNanoseconds {
                        waits.append(TraceRecord(kind: .wait, worker: p, node: node, layer: Int(call.layer), expert: -1, rows: 0,
                                                 start: cursor, end: spans[j].start))
                    }
                    cursor = max(cursor, spans[j].end)
                    reach = max(reach, spans[j].end)
                    j += 1
                }
                if call.end > cursor + minimumNanoseconds {
                    waits.append(TraceRecord(kind: .wait, worker: p, node: node, layer: Int(call.layer), expert: -1, rows: 0,
                                             start: cursor, end: call.end))
                }
                i = j
            }
        }
        return waits
    }

    /// Calls waiting for the executor over time, from the `queued` spans: (time, depth) at every change.
    public static func queueDepth(_ records: [TraceRecord]) -> [(time: UInt64, depth: Int)] {
        var changes: [(UInt64, Int)] = []
        for r in records where r.kind == .queued {
            changes.append((r.start, 1))
            changes.append((r.end, -1))
        }
        // Ends before starts at the same instant, so a handoff does not count twice.
        changes.sort { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
        var result: [(UInt64, Int)] = []
        var depth = 0
        for (time, delta) in changes {
            depth += delta
            if let last = result.last, last.0 == time { result[result.count - 1].1 = depth } else { result.append((time, depth)) }
        }
        return result
    }

    // MARK: - Rendering

    struct Sink {
        let file: AtomicFile?
        var bytes: [UInt8] = []

        mutating func append(_ text: String) throws {
            bytes.append(contentsOf: text.utf8)
            if let file, bytes.count >= 1 << 20 {
                try file.write(bytes)
                bytes.removeAll(keepingCapacity: true)
            }
        }

        mutating func flush() throws {
            if let file, !bytes.isEmpty {
                try file.write(bytes)
                bytes.removeAll()
            }
        }
    }

    /// Greedy interval partitioning (spans taken by start): the first lane free at `span.start`, or a new one;
    /// `ends` holds each lane's latest end.
    static func lane(for span: TraceRecord, ends: inout [UInt64]) -> Int {
        if let lane = ends.firstIndex(where: { $0 <= span.start }) {
            ends[lane] = span.end
            return lane
        }
        ends.append(span.end)
        return ends.count - 1
    }

    static func render(_ input: [TraceRecord], context: Context, into sink: inout Sink) throws {
        var records = input
        if !records.contains(where: { $0.kind == .wait }) { records += derivedWaits(input) }
        let origin = records.map(\.start).min() ?? 0
        func micros(_ t: UInt64) -> String {
            let ns = t >= origin ? t - origin : 0
            let frac = String(ns % 1000)
            return String(ns / 1000) + "." + String(repeating: "0", count: 3 - frac.count) + frac
        }
        func duration(_ r: TraceRecord) -> String {
            let ns = r.end - r.start
            let frac = String(ns % 1000)
            return String(ns / 1000) + "." + String(repeating: "0", count: 3 - frac.count) + frac
        }
        func quoted(_ s: String) -> String { JSONValue.string(s).serialized() }
        func layerName(_ l: Int32) -> String { l >= 0 && Int(l) < context.layerNames.count ? context.layerNames[Int(l)] : "layer \(l)" }

        var first = true
        func emit(_ event: String) throws {
            try sink.append(first ? "\n" : ",\n")
            first = false
            try sink.append(event)
        }

        try sink.append("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[")
        // Metadata: processes (nodes) and threads (participants).
        let callerNode = context.participantNodes.first ?? 0
        var nodes = Set(context.participantNodes)
        for r in records { nodes.insert(Int(r.node)) }
        for node in nodes.sorted() {
            try emit("{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":\(node),\"tid\":0,\"args\":{\"name\":\(quoted("NUMA node \(node)"))}}")
            try emit("{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":\(node),\"tid\":0,\"args\":{\"sort_index\":\(node)}}")
        }
        var threads: [Int: Int] = [:]  // participant -> node
        for (p, node) in context.participantNodes.enumerated() { threads[p] = node }
        for r in records where threads[Int(r.worker)] == nil { threads[Int(r.worker)] = Int(r.node) }
        for (p, node) in threads.sorted(by: { $0.key < $1.key }) {
            let cpu = p < context.participantCPUs.count ? context.participantCPUs[p] : nil
            let pool = context.participantNodes.count
            let name = p == 0 ? "caller (participant 0)" : participantLabel(p, pool: pool) + (cpu.map { " (cpu \($0))" } ?? "")
            try emit("{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":\(node),\"tid\":\(p),\"args\":{\"name\":\(quoted(name))}}")
            try emit("{\"name\":\"thread_sort_index\",\"ph\":\"M\",\"pid\":\(node),\"tid\":\(p),\"args\":{\"sort_index\":\(p)}}")
        }

        // Queue lanes: greedy interval partitioning, so lane spans never overlap.
        let queued = records.filter { $0.kind == .queued }.sorted { $0.start < $1.start }
        var laneEnds: [UInt64] = []
        let laneOf = queued.map { Self.lane(for: $0, ends: &laneEnds) }
        for lane in laneEnds.indices {
            let tid = queueLaneBase + lane
            try emit("{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":\(callerNode),\"tid\":\(tid),\"args\":{\"name\":\(quoted("queued calls, lane \(lane)"))}}")
            try emit("{\"name\":\"thread_sort_index\",\"ph\":\"M\",\"pid\":\(callerNode),\"tid\":\(tid),\"args\":{\"sort_index\":\(tid)}}")
        }
        for (i, r) in queued.enumerated() {
            try emit("{\"name\":\"queued\",\"cat\":\"queue\",\"ph\":\"X\",\"ts\":\(micros(r.start)),\"dur\":\(duration(r)),\"pid\":\(callerNode),\"tid\":\(queueLaneBase + laneOf[i]),\"args\":{\"layer\":\(quoted(layerName(r.layer))),\"rows\":\(r.rows)}}")
        }

        // Call spans: on the thread of the participant that reported them while they nest there (with its other
        // calls and with its phases); a call that overlaps another without nesting (calls merged into one dispatch, a
        // chunked call running on across dispatches, or across dispatch lanes, so starting while the thread that
        // completed it was busy with something else) goes on a call lane of its own.
        let callSpans = records.filter { $0.kind == .call }.sorted { $0.start != $1.start ? $0.start < $1.start : $0.end > $1.end }
        var phasesOf: [Int: [(start: UInt64, end: UInt64)]] = [:]
        for r in records where r.kind != .queued && r.kind != .call { phasesOf[Int(r.worker), default: []].append((r.start, r.end)) }
        for key in phasesOf.keys { phasesOf[key]!.sort { $0.start < $1.start } }
        /// A phase span of the call's thread that one of the call's edges cuts through: one that begins before the
        /// call and ends inside it, or begins inside it and ends after it (by more than 1 us, the slack a reader of
        /// the trace allows at an inner span's end).
        func cutsPhase(_ r: TraceRecord) -> Bool {
            guard let phases = phasesOf[Int(r.worker)], !phases.isEmpty else { return false }
            // The first phase span starting at or after the call's start.
            var low = 0, high = phases.count
            while low < high {
                let mid = (low + high) / 2
                if phases[mid].start < r.start { low = mid + 1 } else { high = mid }
            }
            var k = low - 1
            while k >= 0 && k >= low - 64 {
                let p = phases[k]
                if p.end > r.start + 1 && r.end > p.end + 1000 { return true }
                k -= 1
            }
            var j = low
            while j < phases.count && phases[j].start + 1 < r.end {
                let p = phases[j]
                if p.start > r.start && p.end > r.end + 1000 { return true }
                j += 1
            }
            return false
        }
        var callStacks: [Int: [UInt64]] = [:]
        var callLaneEnds: [UInt64] = []
        var callTid: [Int] = []
        for r in callSpans {
            let worker = Int(r.worker)
            var stack = callStacks[worker] ?? []
            while let top = stack.last, top <= r.start { stack.removeLast() }
            if (stack.last.map({ r.end <= $0 }) ?? true) && !cutsPhase(r) {
                stack.append(r.end)
                callTid.append(worker)
            } else {
                callTid.append(callLaneBase + Self.lane(for: r, ends: &callLaneEnds))
            }
            callStacks[worker] = stack
        }
        for lane in callLaneEnds.indices {
            let tid = callLaneBase + lane
            try emit("{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":\(callerNode),\"tid\":\(tid),\"args\":{\"name\":\(quoted("overlapping calls, lane \(lane)"))}}")
            try emit("{\"name\":\"thread_sort_index\",\"ph\":\"M\",\"pid\":\(callerNode),\"tid\":\(tid),\"args\":{\"sort_index\":\(tid)}}")
        }
        for (i, r) in callSpans.enumerated() {
            let args = "\"layer\":\(quoted(layerName(r.layer))),\"rows\":\(r.rows)"
            let pid = callTid[i] >= callLaneBase ? callerNode : Int(r.node)
            try emit("{\"name\":\(quoted(layerName(r.layer))),\"cat\":\"call\",\"ph\":\"X\",\"ts\":\(micros(r.start)),\"dur\":\(duration(r)),\"pid\":\(pid),\"tid\":\(callTid[i]),\"args\":{\(args)}}")
        }

        // The other spans, outer before inner at equal starts.
        let spans = records.filter { $0.kind != .queued && $0.kind != .call }.sorted { $0.start != $1.start ? $0.start < $1.start : $0.end > $1.end }
        for r in spans {
            let name: String
            var args = "\"layer\":\(quoted(layerName(r.layer))),\"rows\":\(r.rows)"
            switch r.kind {
            case .item, .steal:
                name = "expert \(r.expert)"
                let expertName = r.expert >= 0 && Int(r.expert) < context.expertNames.count ? context.expertNames[Int(r.expert)] : "?"
                args += ",\"expert\":\(r.expert),\"expert_name\":\(quoted(expertName))"
            default: name = r.kind.rawValue
            }
            try emit("{\"name\":\(quoted(name)),\"cat\":\"\(r.kind.rawValue)\",\"ph\":\"X\",\"ts\":\(micros(r.start)),\"dur\":\(duration(r)),\"pid\":\(r.node),\"tid\":\(r.worker),\"args\":{\(args)}}")
        }

        // Queue depth counter.
        for point in queueDepth(records) {
            try emit("{\"name\":\"queue depth\",\"ph\":\"C\",\"ts\":\(micros(point.time)),\"pid\":\(callerNode),\"tid\":0,\"args\":{\"calls waiting\":\(point.depth)}}")
        }
        try sink.append("\n],\"otherData\":{")
        var other: [(String, String)] = [("dropped_events", String(context.dropped)), ("recorded_events", String(input.count))]
        other += context.metadata.map { ($0.0, quoted($0.1)) }
        try sink.append(other.map { "\(quoted($0.0)):\($0.1)" }.joined(separator: ","))
        try sink.append("}}\n")
    }
}
