import PhatgooseRuntime

/// One `RuntimeEvent` as the trace ring stores it: 40 bytes, no references, so the ring is one flat allocation.
public struct TraceRecord: Sendable, Equatable {
    /// Monotonic nanoseconds (``MonotonicClock``).
    public var start: UInt64
    public var end: UInt64
    /// Module index in the library.
    public var layer: Int32
    public var rows: Int32
    /// Expert index for items and steals, else -1.
    public var expert: Int32
    /// Participant: 0 is the calling thread, 1... the workers.
    public var worker: UInt16
    /// NUMA node of the participant.
    public var node: UInt8
    public var kind: RuntimeEvent.Kind

    public init(_ event: RuntimeEvent) {
        start = event.start
        end = max(event.end, event.start)
        layer = Int32(clamping: event.layer)
        rows = Int32(clamping: event.rows)
        expert = event.expert
        worker = UInt16(clamping: event.worker)
        node = UInt8(clamping: event.node)
        kind = event.kind
    }

    public init(kind: RuntimeEvent.Kind, worker: Int, node: Int, layer: Int, expert: Int32, rows: Int, start: UInt64, end: UInt64) {
        self.init(RuntimeEvent(kind: kind, worker: worker, node: node, layer: layer, expert: expert, rows: rows, start: start, end: end))
    }

    public var duration: UInt64 { end - start }

    static let empty = TraceRecord(kind: .call, worker: 0, node: 0, layer: 0, expert: -1, rows: 0, start: 0, end: 0)
}
