import PhatgooseRuntime
import Synchronization

/// Records runtime events into a bounded ring: memory is fixed at `init` (``capacity`` records of 40 bytes), and once
/// the ring is full each new event overwrites the oldest, which is counted in ``dropped``. So a long run keeps its
/// most recent window and says how much it lost.
///
/// Recording starts switched off (``setRecording(_:)``), so a load test can trace its measured window only.
///
/// # Thread safety
/// `observe` is called concurrently from the calling thread and the runtime's workers. The ring is a `Locked` (pthread) held
/// for one store (tens of nanoseconds): the runtime emits events at most once per work item, so contention is rare
/// and short. `recording` is an atomic read once per event.
public final class TraceRecorder: RuntimeObserver, Sendable {
    /// Most events held.
    public let capacity: Int
    private let ring: Locked<Ring>
    private let recording = Atomic<Bool>(false)

    struct Ring {
        var storage: [TraceRecord]
        /// Events ever written; the next goes to `written % capacity`.
        var written: Int
    }

    /// A ring of `capacity` events (at least 1).
    public init(capacity: Int) {
        precondition(capacity >= 1, "a trace ring holds at least one event")
        self.capacity = capacity
        ring = Locked(Ring(storage: [TraceRecord](repeating: .empty, count: capacity), written: 0))
    }

    /// Starts or stops recording; events observed while stopped are ignored (not counted as dropped).
    public func setRecording(_ on: Bool) { recording.store(on, ordering: .releasing) }
    public var isRecording: Bool { recording.load(ordering: .acquiring) }

    public func observe(_ event: RuntimeEvent) {
        guard recording.load(ordering: .relaxed) else { return }
        let record = TraceRecord(event)
        ring.withLock { ring in
            ring.storage[ring.written % capacity] = record
            ring.written += 1
        }
    }

    /// Events recorded so far, overwritten ones included.
    public var written: Int { ring.withLock { $0.written } }
    /// Events overwritten because the ring was full.
    public var dropped: Int { ring.withLock { max(0, $0.written - capacity) } }

    /// The events held, oldest first.
    public func records() -> [TraceRecord] {
        ring.withLock { ring in
            if ring.written <= capacity { return Array(ring.storage[0..<ring.written]) }
            let head = ring.written % capacity
            return Array(ring.storage[head...]) + Array(ring.storage[..<head])
        }
    }

    /// Forgets every event (and the drop count).
    public func reset() { ring.withLock { $0.written = 0 } }
}
