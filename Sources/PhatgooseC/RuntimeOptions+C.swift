import CPhatgoose
import PhatgooseLibrary
import PhatgooseRouting
import PhatgooseRuntime

/// The defaults `phatgoose_runtime_options_init` writes.
private let defaultOptions = phatgoose_runtime_options(
    struct_size: UInt32(MemoryLayout<phatgoose_runtime_options>.size),
    router: Int32(PHATGOOSE_ROUTER_DEFAULT.rawValue), top_k: 0, sequence_length: 0, arrow_temperature: 10, arrow_scaled: 0,
    workers: PHATGOOSE_WORKERS_DEFAULT, executor: Int32(PHATGOOSE_EXECUTOR_PINNED.rawValue),
    placement: Int32(PHATGOOSE_PLACEMENT_DISTRIBUTE.rawValue), placement_argument: 0,
    max_queued_calls: Int32(RuntimeOptions().maxQueuedCalls), reserved: 0, memory_cap_bytes: 0,
    spin_microseconds: PHATGOOSE_SPIN_DEFAULT, parallel_min_tokens: 1, lanes: 0, contended_min_tokens: 0)

/// The smallest `struct_size` accepted: the struct of ABI version 1 (up to `memory_cap_bytes`).
private let minimumOptionsSize = 56

/// Where each field added since ABI 1 ends: a struct_size covers the fields that end at or below it.
private let laterFieldEnds = [MemoryLayout<phatgoose_runtime_options>.offset(of: \.spin_microseconds)! + 4,
                              MemoryLayout<phatgoose_runtime_options>.offset(of: \.parallel_min_tokens)! + 4,
                              MemoryLayout<phatgoose_runtime_options>.offset(of: \.lanes)! + 4,
                              MemoryLayout<phatgoose_runtime_options>.offset(of: \.contended_min_tokens)! + 4]

/// The bytes of the fields this library knows that a struct of `size` bytes holds whole.
private func knownBytes(_ size: Int) -> Int {
    laterFieldEnds.filter { $0 <= size }.max() ?? minimumOptionsSize
}

/// The largest `struct_size` accepted, so that an uninitialised struct's garbage size never sends a read or a write
/// far past the caller's struct.
private let maximumOptionsSize = 4096

/// `struct_size` checked against the sizes this library accepts.
private func checkedOptionsSize(_ size: Int, hint: String = "") throws(ABIError) -> Int {
    guard size >= minimumOptionsSize && size <= maximumOptionsSize else {
        throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "options struct_size: expected \(minimumOptionsSize) to \(maximumOptionsSize)\(hint), found \(UInt(bitPattern: size))")
    }
    return size
}

@c @implementation
public func phatgoose_runtime_options_init(_ options: UnsafeMutablePointer<phatgoose_runtime_options>?, _ structSize: Int) -> phatgoose_status {
    abiCall {
        let out = UnsafeMutableRawPointer(try required(options, "options"))
        let size = try checkedOptionsSize(structSize)
        // The fields this library knows get their defaults; bytes beyond them (fields of a newer header) are zeroed,
        // which is what `runtimeOptions` accepts there.
        var defaults = defaultOptions
        defaults.struct_size = UInt32(size)
        let known = knownBytes(size)
        withUnsafeBytes(of: &defaults) { out.copyMemory(from: $0.baseAddress!, byteCount: known) }
        (out + known).initializeMemory(as: UInt8.self, repeating: 0, count: size - known)
    }
}

/// `RuntimeOptions` from the caller's struct (nil: every default), for serving `library`. Checks every field, so
/// nothing out of range reaches the runtime.
func runtimeOptions(_ pointer: UnsafePointer<phatgoose_runtime_options>?, library: ExpertLibrary) throws(ABIError) -> RuntimeOptions {
    var c = defaultOptions
    if let pointer {
        let raw = UnsafeRawPointer(pointer)
        let size = try checkedOptionsSize(Int(raw.loadUnaligned(as: UInt32.self)), hint: " (initialise with phatgoose_runtime_options_init)")
        let known = knownBytes(size)
        withUnsafeMutableBytes(of: &c) { $0.copyMemory(from: UnsafeRawBufferPointer(start: raw, count: known)) }
        // Bytes beyond the fields this library knows belong to fields of a newer header; zero is their default
        // (what phatgoose_runtime_options_init writes), anything else asks for something this library cannot do.
        if let offset = (known..<size).first(where: { raw.load(fromByteOffset: $0, as: UInt8.self) != 0 }) {
            let byte = raw.load(fromByteOffset: offset, as: UInt8.self)
            throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "options: expected zero bytes beyond the \(known) this library knows "
                           + "(struct_size \(size): fields of a newer header left at their defaults), found byte \(offset) = 0x\(String(byte, radix: 16))")
        }
    }
    func invalid(_ field: String, _ expected: String, _ found: some CustomStringConvertible) -> ABIError {
        ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "options \(field): expected \(expected), found \(found)")
    }
    guard c.reserved == 0 else { throw invalid("reserved", "0", c.reserved) }

    var routing = RoutingOptions(defaults: library.routing)
    switch UInt32(bitPattern: c.router) {
    case PHATGOOSE_ROUTER_DEFAULT.rawValue: break
    case PHATGOOSE_ROUTER_PHATGOOSE.rawValue: routing.router = .phatgoose
    case PHATGOOSE_ROUTER_ARROW.rawValue: routing.router = .arrow
    case PHATGOOSE_ROUTER_UNIFORM.rawValue: routing.router = .uniform
    default: throw invalid("router", "a phatgoose_router (0 to 3)", c.router)
    }
    guard (0...PHATGOOSE_MAX_TOP_K).contains(c.top_k) else { throw invalid("top_k", "0 (the library's) to \(PHATGOOSE_MAX_TOP_K)", c.top_k) }
    if c.top_k > 0 { routing.topK = Int(c.top_k) }
    guard c.sequence_length >= 0 else { throw invalid("sequence_length", "0 (per token) or more", c.sequence_length) }
    if c.sequence_length > 0 { routing.granularity = .sequence(length: Int(c.sequence_length)) }
    guard c.arrow_temperature.isFinite && c.arrow_temperature > 0 else { throw invalid("arrow_temperature", "a positive number", c.arrow_temperature) }
    routing.arrowTemperature = c.arrow_temperature
    routing.arrowScaled = c.arrow_scaled != 0

    var options = RuntimeOptions(routing: routing)
    guard c.workers == PHATGOOSE_WORKERS_DEFAULT || (0...1024).contains(c.workers) else {
        throw invalid("workers", "0 to 1024 or PHATGOOSE_WORKERS_DEFAULT (-1)", c.workers)
    }
    options.workers = c.workers == PHATGOOSE_WORKERS_DEFAULT ? nil : Int(c.workers)
    switch UInt32(bitPattern: c.executor) {
    case PHATGOOSE_EXECUTOR_PINNED.rawValue: options.executor = .pinned
    case PHATGOOSE_EXECUTOR_DISPATCH.rawValue: options.executor = .dispatch
    default: throw invalid("executor", "a phatgoose_executor (0 or 1)", c.executor)
    }
    switch UInt32(bitPattern: c.placement) {
    case PHATGOOSE_PLACEMENT_DISTRIBUTE.rawValue: options.placement = .distribute
    case PHATGOOSE_PLACEMENT_ISOLATE.rawValue: options.placement = .isolate(node: Int(c.placement_argument))
    case PHATGOOSE_PLACEMENT_REPLICATE_HOT.rawValue: options.placement = .replicateHot(count: Int(c.placement_argument))
    case PHATGOOSE_PLACEMENT_IN_PLACE.rawValue: options.placement = .inPlace
    default: throw invalid("placement", "a phatgoose_placement (0 to 3)", c.placement)
    }
    guard c.max_queued_calls >= 1 else { throw invalid("max_queued_calls", "at least 1", c.max_queued_calls) }
    options.maxQueuedCalls = Int(c.max_queued_calls)
    options.memoryCapBytes = c.memory_cap_bytes == 0 ? nil : Int(clamping: c.memory_cap_bytes)
    switch c.spin_microseconds {
    case PHATGOOSE_SPIN_DEFAULT: break
    case PHATGOOSE_SPIN_NONE: options.spinMicroseconds = 0
    case 1...1_000_000: options.spinMicroseconds = Int(c.spin_microseconds)
    default: throw invalid("spin_microseconds", "1 to 1000000, PHATGOOSE_SPIN_DEFAULT (0) or PHATGOOSE_SPIN_NONE (-1)", c.spin_microseconds)
    }
    guard c.parallel_min_tokens >= 0 else { throw invalid("parallel_min_tokens", "0 or more", c.parallel_min_tokens) }
    options.parallelMinTokens = max(1, Int(c.parallel_min_tokens))
    // The runtime checks the upper bound (the participants are known once the workers are).
    guard c.lanes >= 0 else { throw invalid("lanes", "0 (one per participant) or more", c.lanes) }
    options.lanes = c.lanes == 0 ? nil : Int(c.lanes)
    switch c.contended_min_tokens {
    case 0: break
    case PHATGOOSE_CONTENDED_OFF: options.contendedMinTokens = 0
    case 1...: options.contendedMinTokens = Int(c.contended_min_tokens)
    default: throw invalid("contended_min_tokens", "0 (the default), PHATGOOSE_CONTENDED_OFF (-1) or a token count", c.contended_min_tokens)
    }
    return options
}
