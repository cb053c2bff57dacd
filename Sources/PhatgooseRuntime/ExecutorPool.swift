import PhatgooseRouting
import Synchronization

/// A free list of single-threaded executors, so many threads can apply layers at once, each with its own scratch.
///
/// # Thread safety
/// `list` is protected by its `Mutex`. An executor is handed to one caller at a time and returned after the call.
final class ExecutorPool: Sendable {
    /// Carries an executor in and out of the mutex. `@unchecked Sendable` is safe because a box is only ever held
    /// by the pool (under the lock) or by the one caller that took it out: never by two threads at once.
    private final class Box: @unchecked Sendable {
        let executor = LayerExecutor()
    }

    private let list = Mutex<[Box]>([])

    /// Runs `body` with an executor taken from the pool (or a new one), then returns it to the pool.
    func withExecutor<R>(_ body: (LayerExecutor) throws -> R) rethrows -> R {
        let box = list.withLock { $0.popLast() } ?? Box()
        defer { list.withLock { $0.append(box) } }
        return try body(box.executor)
    }
}
