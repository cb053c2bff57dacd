import PhatgooseRuntime

/// Passes every event to several observers in order, so a run can trace, account and export metrics at once
/// through the runtime's single observer slot.
///
/// # Thread safety
/// Immutable; thread-safe when its observers are (every `RuntimeObserver` must be).
public final class ObserverFanout: RuntimeObserver, Sendable {
    public let observers: [any RuntimeObserver]

    public init(_ observers: [any RuntimeObserver]) { self.observers = observers }

    public func observe(_ event: RuntimeEvent) {
        for observer in observers { observer.observe(event) }
    }
}
