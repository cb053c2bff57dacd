import CPhatgoose
import PhatgooseDistributed
import PhatgooseLibrary
import PhatgooseRuntime
import Synchronization

/// The kinds of C handle; the kind is part of a handle's bits, so a handle of one kind passed where another is
/// expected is refused by name.
enum HandleKind: UInt, Sendable {
    case library = 1
    case runtime = 2
    case layer = 3
    case distributed = 4

    var name: String {
        switch self {
        case .library: return "library"
        case .runtime: return "runtime"
        case .layer: return "layer"
        case .distributed: return "distributed runtime"
        }
    }

    /// "a library", "a runtime", "a layer".
    var noun: String { "a " + name }
}

/// A runtime as the C ABI serves it: the runtime, and whether `phatgoose_runtime_shutdown` was called (the runtime
/// keeps that state privately; the ABI needs it to refuse every later call, not only applies).
///
/// # Thread safety
/// `runtime` is `Sendable` (see ``Runtime``); `isShutDown` is an atomic. Shared by every call that looked it up.
final class ServedRuntime: Sendable {
    let runtime: Runtime
    let isShutDown = Atomic<Bool>(false)

    init(_ runtime: Runtime) { self.runtime = runtime }

    /// Throws `.shutDown` after `phatgoose_runtime_shutdown`.
    func checkRunning() throws(ABIError) {
        if isShutDown.load(ordering: .acquiring) {
            throw ABIError(PHATGOOSE_STATUS_SHUT_DOWN, "runtime: expected a running runtime, found it shut down")
        }
    }
}

/// A layer handle's target: the runtime it belongs to (and that runtime's handle bits, to check the pair passed to
/// an apply), and the runtime's own handle of the module.
struct LayerEntry: Sendable {
    let owner: UInt
    let served: ServedRuntime
    let handle: LayerHandle
}

/// What a handle stands for.
enum HandleObject: Sendable {
    case library(ExpertLibrary)
    case runtime(ServedRuntime)
    case layer(LayerEntry)
    case distributed(DistributedRuntime)

    var kind: HandleKind {
        switch self {
        case .library: return .library
        case .runtime: return .runtime
        case .layer: return .layer
        case .distributed: return .distributed
        }
    }
}

/// Every live C handle. A handle is not a pointer to memory but a token, `generation << 32 | slot << 3 | kind`,
/// looked up here on every entry: NULL, garbage, a handle of the wrong kind and a destroyed handle (its slot's
/// generation moved on; a generation comes round again only after 2^32 more handles) are all refused without
/// touching freed memory.
///
/// Removal hands the object back to the caller, so its last release (a runtime's `deinit` joins its workers)
/// happens after the lock is dropped.
///
/// Lookups copy the object out (retaining it), so a call that has looked up a runtime keeps it alive even if
/// another thread destroys the handle meanwhile.
///
/// # Thread safety
/// One global instance behind a `Locked` pthread mutex (``handles``), which ThreadSanitizer sees; every method runs under it.
struct HandleTable: Sendable {
    private var objects: [HandleObject?] = []
    private var generations: [UInt32] = []
    private var freeSlots: [Int] = []
    private var nextGeneration: UInt32 = 1

    private static let slotLimit = 1 << 29

    /// Registers `object`, returning its handle.
    mutating func insert(_ object: HandleObject) throws(ABIError) -> OpaquePointer {
        let generation = nextGeneration
        nextGeneration = nextGeneration == UInt32.max ? 1 : nextGeneration + 1
        let slot: Int
        if let reused = freeSlots.popLast() {
            slot = reused
            objects[slot] = object
            generations[slot] = generation
        } else {
            guard objects.count < Self.slotLimit else {
                throw ABIError(PHATGOOSE_STATUS_INTERNAL, "handles: expected fewer than \(Self.slotLimit) live handles, found no free slot")
            }
            slot = objects.count
            objects.append(object)
            generations.append(generation)
        }
        let bits = UInt(generation) << 32 | UInt(slot) << 3 | object.kind.rawValue
        // Never NULL: the kind bits are nonzero.
        return OpaquePointer(bitPattern: bits)!
    }

    /// The live slot of `handle`, which must be of `kind`.
    ///
    /// Bits that do not name a live handle (garbage, a destroyed handle, a forged one) are reported as no handle,
    /// whatever their kind bits say: only a handle that is live is described as a handle of its kind.
    private func slot(of handle: OpaquePointer?, _ kind: HandleKind, role: String) throws(ABIError) -> Int {
        guard let handle else {
            throw ABIError(PHATGOOSE_STATUS_INVALID_HANDLE, "\(role): expected \(kind.noun) handle, found NULL")
        }
        let bits = UInt(bitPattern: Int(bitPattern: handle))
        if let slot = liveSlot(bits), let live = objects[slot]?.kind {
            if live == kind { return slot }
            throw ABIError(PHATGOOSE_STATUS_INVALID_HANDLE, "\(role): expected \(kind.noun) handle, found \(live.noun) handle (\(Self.describe(bits)), not \(kind.noun) handle)")
        }
        throw ABIError(PHATGOOSE_STATUS_INVALID_HANDLE, "\(role): expected a live \(kind.name) handle, found no handle (\(Self.describe(bits)): one that was destroyed or never made)")
    }

    /// The slot of the live handle whose bits are exactly `bits`, of the kind they carry; nil when no live handle
    /// has these bits.
    private func liveSlot(_ bits: UInt) -> Int? {
        guard let kind = HandleKind(rawValue: bits & 7) else { return nil }
        let slot = Int((bits >> 3) & UInt(Self.slotLimit - 1))
        let generation = UInt32(truncatingIfNeeded: bits >> 32)
        // The kind is checked against the object too, so a live slot and generation with another kind's bits is
        // no handle.
        guard slot < objects.count, generations[slot] == generation, objects[slot]?.kind == kind else { return nil }
        return slot
    }

    private static func describe(_ bits: UInt) -> String { "0x" + String(bits, radix: 16) }

    func library(_ handle: OpaquePointer?, role: String = "library") throws(ABIError) -> ExpertLibrary {
        if case let .library(library)? = objects[try slot(of: handle, .library, role: role)] { return library }
        throw Self.kindMismatch(role)
    }

    func runtime(_ handle: OpaquePointer?, role: String = "runtime") throws(ABIError) -> ServedRuntime {
        if case let .runtime(served)? = objects[try slot(of: handle, .runtime, role: role)] { return served }
        throw Self.kindMismatch(role)
    }

    func distributed(_ handle: OpaquePointer?, role: String = "runtime") throws(ABIError) -> DistributedRuntime {
        if case let .distributed(runtime)? = objects[try slot(of: handle, .distributed, role: role)] { return runtime }
        throw Self.kindMismatch(role)
    }

    func layer(_ handle: OpaquePointer?, role: String = "layer") throws(ABIError) -> LayerEntry {
        if case let .layer(entry)? = objects[try slot(of: handle, .layer, role: role)] { return entry }
        throw Self.kindMismatch(role)
    }

    /// Unreachable (`slot(of:)` checks the object's kind); an error rather than a trap all the same.
    private static func kindMismatch(_ role: String) -> ABIError {
        ABIError(PHATGOOSE_STATUS_INTERNAL, "\(role): handle table holds an object of another kind")
    }

    /// Unregisters `handle` (of `kind`), returning what it stood for.
    @discardableResult
    mutating func remove(_ handle: OpaquePointer?, _ kind: HandleKind) throws(ABIError) -> HandleObject {
        let slot = try slot(of: handle, kind, role: kind.name)
        guard let object = objects[slot] else { throw Self.kindMismatch(kind.name) }
        release(slot)
        return object
    }

    /// Unregisters every layer of the runtime whose handle bits are `owner`.
    mutating func removeLayers(of owner: UInt) {
        for slot in objects.indices {
            if case let .layer(entry)? = objects[slot], entry.owner == owner { release(slot) }
        }
    }

    private mutating func release(_ slot: Int) {
        objects[slot] = nil
        freeSlots.append(slot)
    }
}

/// The process's handles.
let handles = Locked(HandleTable())

/// The bits of a handle, for comparing owners.
func handleBits(_ handle: OpaquePointer?) -> UInt { UInt(bitPattern: Int(bitPattern: handle)) }
