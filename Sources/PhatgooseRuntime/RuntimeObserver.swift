/// What the runtime reports to an observer: every phase of every call, with monotonic nanosecond timestamps.
public struct RuntimeEvent: Sendable {
    /// Which phase an event records.
    public enum Kind: String, Sendable {
        /// A call waited for the executor (its queueing time), from `start` to `end`.
        case queued
        /// One participant routed a range of tokens (`rows` tokens).
        case routing
        /// The caller built the dispatch plan (`rows` assignments).
        case plan
        /// A work item: `expert`'s LoRA over `rows` gathered tokens (gather, shrink, scale, expand).
        case item
        /// Like `item`, but taken from another participant's queue.
        case steal
        /// A participant ran out of work before the phase ended (the caller's idle time until the join).
        case wait
        /// One participant combined a range of tokens (`rows` tokens).
        case combine
        /// The whole call, `rows` tokens.
        case call
    }

    /// Which phase this event records.
    public var kind: Kind
    /// Participant: 0 is the calling thread, 1... the workers.
    public var worker: Int
    /// NUMA node of the participant.
    public var node: Int
    /// Index of the layer (module) in the library.
    public var layer: Int
    /// Expert index for items and steals, else -1.
    public var expert: Int32
    /// Rows the event covers (tokens, assignments or gathered tokens, as its kind says).
    public var rows: Int
    /// When the phase began: monotonic nanoseconds.
    public var start: UInt64
    /// When the phase ended: monotonic nanoseconds.
    public var end: UInt64

    /// Creates an event from its parts.
    public init(kind: Kind, worker: Int, node: Int, layer: Int, expert: Int32, rows: Int, start: UInt64, end: UInt64) {
        self.kind = kind
        self.worker = worker
        self.node = node
        self.layer = layer
        self.expert = expert
        self.rows = rows
        self.start = start
        self.end = end
    }
}

/// Sees every phase of every call. Called from the calling thread and from worker threads, concurrently: an
/// implementation must be thread-safe and fast (it runs inside the hot path). When no observer is set, the runtime
/// takes no timestamps and makes no calls.
public protocol RuntimeObserver: AnyObject, Sendable {
    /// Receives one event; called concurrently from the calling thread and the workers, so it must be
    /// thread-safe and fast.
    func observe(_ event: RuntimeEvent)
}
