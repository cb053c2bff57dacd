import CPhatgoose
import PhatgooseRuntime

// phatgoose_runtime_apply and _apply_layers: see include/phatgoose.h. Everything the runtime would trap on or
// misread is checked here first: handles, counts (exact, except that routing rows may be wider than the slots; and
// products without overflow), NULL, alignment and overlapping buffers. The runtime then checks sizes once more
// against the snapshot the call really runs on (a concurrent expert change can alter a uniform router's slots),
// reporting a mismatch as SHAPE.
//
// The single-layer path allocates nothing on success (messages are built only on failure), so it keeps the
// runtime's allocation-free call path allocation-free through the C ABI.

@c @implementation
public func phatgoose_runtime_apply(_ runtime: OpaquePointer?, _ layer: OpaquePointer?, _ input: UnsafePointer<Float>?, _ tokens: Int, _ inputCount: Int,
                                    _ output: UnsafeMutablePointer<Float>?, _ outputCount: Int, _ experts: UnsafeMutablePointer<Int32>?,
                                    _ weights: UnsafeMutablePointer<Float>?, _ routingCount: Int) -> phatgoose_status {
    abiCall {
        let (served, entry) = try handles.withLock { table throws(ABIError) -> (ServedRuntime, LayerEntry) in
            (try table.runtime(runtime), try ownedLayer(layer, of: runtime, in: table, role: "layer"))
        }
        try served.checkRunning()
        let tokens = try count(tokens, "tokens")
        let inputCount = try count(inputCount, "input_count")
        let request = phatgoose_layer_output(layer: layer, output: output, output_count: outputCount, experts: experts, weights: weights,
                                             routing_count: routingCount)
        let checked = try checkLayer(served, entry.handle, request, tokens: tokens, withRouting: experts != nil || weights != nil) { $0 }
        let inputExtent = try checkBuffer(input, as: Float.self, count: inputCount, expected: product(tokens, checked.inWidth, "input"),
                                          tokens: tokens, width: checked.inWidth, name: "layer \(entry.handle.name): input_count")
        try checkOverlaps(inputExtent, checked)
        try served.runtime.apply(entry.handle, input: UnsafeBufferPointer(start: input, count: inputCount), tokens: tokens,
                                 output: UnsafeMutableBufferPointer(start: output, count: checked.outputCount),
                                 experts: experts.map { UnsafeMutableBufferPointer(start: $0, count: checked.routingCount) },
                                 weights: weights.map { UnsafeMutableBufferPointer(start: $0, count: checked.routingCount) })
    }
}

@c @implementation
public func phatgoose_runtime_apply_layers(_ runtime: OpaquePointer?, _ input: UnsafePointer<Float>?, _ tokens: Int, _ inputCount: Int,
                                           _ layers: UnsafePointer<phatgoose_layer_output>?, _ layerCount: Int) -> phatgoose_status {
    abiCall {
        let n = try count(layerCount, "layer_count")
        guard n >= 1, n <= 4096 else {
            throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "layer_count: expected 1 to 4096 layers, found \(n)")
        }
        guard let layers else { throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "layers: expected an array of \(n) entries, found NULL") }
        let requests = UnsafeBufferPointer(start: layers, count: n)
        // Handles first, in one turn of the lock: the runtime, and layers that belong to it.
        let (served, entries) = try handles.withLock { table throws(ABIError) -> (ServedRuntime, [LayerEntry]) in
            let served = try table.runtime(runtime)
            var entries: [LayerEntry] = []
            entries.reserveCapacity(n)
            for (i, request) in requests.enumerated() {
                entries.append(try ownedLayer(request.layer, of: runtime, in: table, role: "layers[\(i)].layer"))
            }
            return (served, entries)
        }
        try served.checkRunning()
        let tokens = try count(tokens, "tokens")
        let inputCount = try count(inputCount, "input_count")
        let withRouting = requests[0].experts != nil || requests[0].weights != nil
        var checked: [CheckedLayer] = []
        for (i, request) in requests.enumerated() {
            let layer = try checkLayer(served, entries[i].handle, request, tokens: tokens, withRouting: withRouting) { "layers[\(i)].\($0)" }
            if i > 0 && layer.inWidth != checked[0].inWidth {
                throw ABIError(PHATGOOSE_STATUS_SHAPE, "layer \(entries[i].handle.name): expected input width \(checked[0].inWidth), shared with \(entries[0].handle.name), found \(layer.inWidth)")
            }
            checked.append(layer)
        }
        let inputExtent = try checkBuffer(input, as: Float.self, count: inputCount, expected: product(tokens, checked[0].inWidth, "input"),
                                          tokens: tokens, width: checked[0].inWidth, name: "layer \(entries[0].handle.name): input_count")
        // Every written buffer against the input and every other written buffer.
        var written: [(Extent, () -> String)] = []
        for (i, layer) in checked.enumerated() {
            let name = entries[i].handle.name
            written.append((layer.output, { "layer \(name): layers[\(i)].output" }))
            written.append((layer.experts, { "layer \(name): layers[\(i)].experts" }))
            written.append((layer.weights, { "layer \(name): layers[\(i)].weights" }))
        }
        for (a, (extent, name)) in written.enumerated() {
            if extent.overlaps(inputExtent) { throw overlapError(name(), "the input") }
            for (other, otherName) in written[(a + 1)...] where extent.overlaps(other) { throw overlapError(name(), otherName()) }
        }
        try served.runtime.apply(
            entries.map(\.handle), input: UnsafeBufferPointer(start: input, count: inputCount), tokens: tokens,
            outputs: zip(requests, checked).map { UnsafeMutableBufferPointer(start: $0.output, count: $1.outputCount) },
            experts: withRouting ? zip(requests, checked).map { UnsafeMutableBufferPointer(start: $0.experts, count: $1.routingCount) } : nil,
            weights: withRouting ? zip(requests, checked).map { UnsafeMutableBufferPointer(start: $0.weights, count: $1.routingCount) } : nil)
    }
}

/// The layer behind `layer`, which must belong to the runtime `runtime`.
private func ownedLayer(_ layer: OpaquePointer?, of runtime: OpaquePointer?, in table: borrowing HandleTable, role: @autoclosure () -> String) throws(ABIError) -> LayerEntry {
    let entry = try table.layer(layer, role: role())
    guard entry.owner == handleBits(runtime) else {
        throw ABIError(PHATGOOSE_STATUS_INVALID_HANDLE, "\(role()): expected a layer of this runtime, found a layer of another runtime")
    }
    return entry
}

/// A caller's buffer as a byte range; empty when the call reads or writes none of it.
private struct Extent {
    var start: UInt = 0
    var end: UInt = 0

    func overlaps(_ other: Extent) -> Bool {
        start < end && other.start < other.end && start < other.end && other.start < end
    }
}

private func overlapError(_ a: String, _ b: String) -> ABIError {
    ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "buffers: expected no overlap, found \(a) overlapping \(b)")
}

/// One layer's buffers, checked: its input width, the counts to pass on and the extents written.
private struct CheckedLayer {
    var inWidth: Int
    var outputCount: Int
    var routingCount: Int
    var output: Extent
    var experts = Extent()
    var weights = Extent()
}

/// `a * b`, or SHAPE when it does not fit.
private func product(_ a: Int, _ b: Int, _ what: @autoclosure () -> String) throws(ABIError) -> Int {
    let (result, overflow) = a.multipliedReportingOverflow(by: b)
    guard !overflow, result <= Int.max / 8 else {
        throw ABIError(PHATGOOSE_STATUS_SHAPE, "\(what()): expected \(a) x \(b) elements to fit in memory, found the product too large")
    }
    return result
}

/// Checks a buffer argument of `count` elements of `T` (the call needs `expected`, `tokens` rows of `width`; with
/// `widerRows`, rows of more than `width` are accepted too, as for routing buffers).
private func checkBuffer<T>(_ pointer: UnsafePointer<T>?, as _: T.Type, count: Int, expected: Int, tokens: Int, width: Int,
                            widerRows: Bool = false, name: @autoclosure () -> String) throws(ABIError) -> Extent {
    let wider = widerRows && tokens > 0 && count > expected && count % tokens == 0
    guard count == expected || wider else {
        let or = widerRows ? " (or \(tokens) rows of more than \(width))" : ""
        throw ABIError(PHATGOOSE_STATUS_SHAPE, "\(name()): expected \(tokens) x \(width) = \(expected) elements\(or), found \(UInt(bitPattern: count))")
    }
    guard tokens > 0 else { return Extent() }
    guard let pointer else { throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(name()): expected a buffer of \(expected) elements, found NULL") }
    let address = UInt(bitPattern: pointer)
    guard address % UInt(MemoryLayout<T>.alignment) == 0 else {
        throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(name()): expected an address aligned to \(MemoryLayout<T>.alignment) bytes, found 0x\(String(address, radix: 16))")
    }
    let bytes = UInt(count * MemoryLayout<T>.stride)
    guard address <= UInt.max - bytes else {
        throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(name()): expected a buffer within the address space, found one that wraps around")
    }
    return Extent(start: address, end: address + bytes)
}

/// Checks one layer's output and routing buffers against what the runtime serves now. `withRouting`: whether the
/// call has routing buffers (for several layers: whether the first has; all must agree). `field` names a field of
/// the caller's request in messages.
private func checkLayer(_ served: ServedRuntime, _ handle: LayerHandle, _ request: phatgoose_layer_output, tokens: Int, withRouting: Bool,
                        field: (String) -> String) throws(ABIError) -> CheckedLayer {
    let (inWidth, outWidth): (Int, Int)
    let slots: Int
    do {
        (inWidth, outWidth) = try served.runtime.widths(of: handle)
        slots = try served.runtime.slots(of: handle)
    } catch {
        throw ABIError(translating: error)
    }
    let outputCount = try count(request.output_count, field("output_count"))
    var checked = CheckedLayer(
        inWidth: inWidth, outputCount: outputCount, routingCount: 0,
        output: try checkBuffer(UnsafePointer(request.output), as: Float.self, count: outputCount,
                                expected: product(tokens, outWidth, "output"), tokens: tokens, width: outWidth,
                                name: "layer \(handle.name): \(field("output_count"))"))
    guard (request.experts == nil) == (request.weights == nil) else {
        throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "layer \(handle.name): expected experts and weights both or neither, found only \(request.experts == nil ? "weights" : "experts")")
    }
    guard (request.experts != nil) == withRouting else {
        throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "layer \(handle.name): expected routing buffers for every layer or for none, found them for some")
    }
    if withRouting {
        let routingCount = try count(request.routing_count, field("routing_count"))
        let expected = try product(tokens, slots, "routing")
        checked.routingCount = routingCount
        // Rows wider than the slots are accepted (their extra slots get expert -1, weight 0), so buffers sized
        // before a uniform router lost a slot stay valid.
        checked.experts = try checkBuffer(UnsafePointer(request.experts), as: Int32.self, count: routingCount, expected: expected, tokens: tokens,
                                          width: slots, widerRows: true, name: "layer \(handle.name): \(field("routing_count")) (experts)")
        checked.weights = try checkBuffer(UnsafePointer(request.weights), as: Float.self, count: routingCount, expected: expected, tokens: tokens,
                                          width: slots, widerRows: true, name: "layer \(handle.name): \(field("routing_count")) (weights)")
    }
    return checked
}

/// The single-layer overlap check, without collections: every written buffer against the input and the others.
private func checkOverlaps(_ input: Extent, _ layer: CheckedLayer) throws(ABIError) {
    let written = (layer.output, layer.experts, layer.weights)
    if written.0.overlaps(input) { throw overlapError("output", "the input") }
    if written.1.overlaps(input) { throw overlapError("experts", "the input") }
    if written.2.overlaps(input) { throw overlapError("weights", "the input") }
    if written.0.overlaps(written.1) { throw overlapError("output", "experts") }
    if written.0.overlaps(written.2) { throw overlapError("output", "weights") }
    if written.1.overlaps(written.2) { throw overlapError("experts", "weights") }
}
