import CPhatgoose
import PhatgooseRuntime

// phatgoose_runtime_apply and _apply_layers: see include/phatgoose.h. Everything the runtime would trap on or
// misread is checked here first: handles, counts (exact, and products without overflow), NULL, alignment and
// overlapping buffers. The runtime then checks sizes once more against the snapshot the call really runs on (a
// concurrent expert change can alter a uniform router's slots), reporting a mismatch as SHAPE.

@c @implementation
func phatgoose_runtime_apply(_ runtime: OpaquePointer?, _ layer: OpaquePointer?, _ input: UnsafePointer<Float>?, _ tokens: Int, _ inputCount: Int,
                             _ output: UnsafeMutablePointer<Float>?, _ outputCount: Int, _ experts: UnsafeMutablePointer<Int32>?,
                             _ weights: UnsafeMutablePointer<Float>?, _ routingCount: Int) -> phatgoose_status {
    abiCall {
        var request = phatgoose_layer_output(layer: layer, output: output, output_count: outputCount, experts: experts,
                                             weights: weights, routing_count: routingCount)
        try withUnsafePointer(to: &request) { pointer in
            try applyLayers(runtime, input: input, tokens: tokens, inputCount: inputCount, UnsafeBufferPointer(start: pointer, count: 1))
        }
    }
}

@c @implementation
func phatgoose_runtime_apply_layers(_ runtime: OpaquePointer?, _ input: UnsafePointer<Float>?, _ tokens: Int, _ inputCount: Int,
                                    _ layers: UnsafePointer<phatgoose_layer_output>?, _ layerCount: Int) -> phatgoose_status {
    abiCall {
        let n = try count(layerCount, "layer_count")
        guard n >= 1, n <= 4096 else {
            throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "layer_count: expected 1 to 4096 layers, found \(n)")
        }
        guard let layers else { throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "layers: expected an array of \(n) entries, found NULL") }
        try applyLayers(runtime, input: input, tokens: tokens, inputCount: inputCount, UnsafeBufferPointer(start: layers, count: n))
    }
}

/// A caller's buffer, as a byte range for the overlap check.
private struct Extent {
    var name: String
    var start: UInt
    var end: UInt
    var writable: Bool
}

/// `a * b`, or SHAPE when it does not fit.
private func product(_ a: Int, _ b: Int, _ what: String) throws(ABIError) -> Int {
    let (result, overflow) = a.multipliedReportingOverflow(by: b)
    guard !overflow, result <= Int.max / 4 else {
        throw ABIError(PHATGOOSE_STATUS_SHAPE, "\(what): expected \(a) x \(b) elements to fit in memory, found the product too large")
    }
    return result
}

/// Checks a buffer argument of `count` elements of `T` and records its extent.
private func checkBuffer<T>(_ pointer: UnsafeRawPointer?, as _: T.Type, count: Int, expected: Int, tokens: Int, width: Int,
                            name: String, writable: Bool, into extents: inout [Extent]) throws(ABIError) {
    guard count == expected else {
        throw ABIError(PHATGOOSE_STATUS_SHAPE, "\(name): expected \(tokens) x \(width) = \(expected) elements, found \(UInt(bitPattern: count))")
    }
    guard tokens > 0 else { return }
    guard let pointer else { throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(name): expected a buffer of \(expected) elements, found NULL") }
    let address = UInt(bitPattern: pointer)
    guard address % UInt(MemoryLayout<T>.alignment) == 0 else {
        throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(name): expected an address aligned to \(MemoryLayout<T>.alignment) bytes, found 0x\(String(address, radix: 16))")
    }
    let bytes = UInt(count * MemoryLayout<T>.stride)
    guard address <= UInt.max - bytes else {
        throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(name): expected a buffer within the address space, found one that wraps around")
    }
    extents.append(Extent(name: name, start: address, end: address + bytes, writable: writable))
}

/// The shared body of both applies: checks every argument, then runs the runtime's call.
private func applyLayers(_ runtime: OpaquePointer?, input: UnsafePointer<Float>?, tokens rawTokens: Int, inputCount rawInputCount: Int,
                         _ requests: UnsafeBufferPointer<phatgoose_layer_output>) throws {
    let single = requests.count == 1
    func role(_ i: Int, _ field: String) -> String { single ? field : "layers[\(i)].\(field)" }

    // Handles first, in one turn of the lock: the runtime, and layers that belong to it.
    let (served, entries) = try handles.withLock { table throws(ABIError) -> (ServedRuntime, [LayerEntry]) in
        let served = try table.runtime(runtime)
        var entries: [LayerEntry] = []
        entries.reserveCapacity(requests.count)
        for (i, request) in requests.enumerated() {
            let entry = try table.layer(request.layer, role: role(i, "layer"))
            guard entry.owner == handleBits(runtime) else {
                throw ABIError(PHATGOOSE_STATUS_INVALID_HANDLE, "\(role(i, "layer")): expected a layer of this runtime, found a layer of another runtime")
            }
            entries.append(entry)
        }
        return (served, entries)
    }
    try served.checkRunning()
    let tokens = try count(rawTokens, "tokens")
    let inputCount = try count(rawInputCount, "input_count")

    let withRouting = requests[0].experts != nil || requests[0].weights != nil
    var extents: [Extent] = []
    var outputs: [UnsafeMutableBufferPointer<Float>] = []
    var experts: [UnsafeMutableBufferPointer<Int32>] = []
    var weights: [UnsafeMutableBufferPointer<Float>] = []
    var inWidth = 0
    for (i, request) in requests.enumerated() {
        let handle = entries[i].handle
        let widths = try served.runtime.widths(of: handle)
        let slots = try served.runtime.slots(of: handle)
        let layerName = "layer \(handle.name)"
        if i == 0 {
            inWidth = widths.inWidth
            try checkBuffer(input, as: Float.self, count: inputCount, expected: product(tokens, inWidth, "input"), tokens: tokens, width: inWidth,
                            name: "\(layerName): input_count", writable: false, into: &extents)
        } else if widths.inWidth != inWidth {
            throw ABIError(PHATGOOSE_STATUS_SHAPE, "\(layerName): expected input width \(inWidth), shared with \(entries[0].handle.name), found \(widths.inWidth)")
        }
        let outputCount = try count(request.output_count, role(i, "output_count"))
        try checkBuffer(request.output, as: Float.self, count: outputCount, expected: product(tokens, widths.outWidth, "output"), tokens: tokens,
                        width: widths.outWidth, name: "\(layerName): \(role(i, "output_count"))", writable: true, into: &extents)
        outputs.append(UnsafeMutableBufferPointer(start: request.output, count: outputCount))

        guard (request.experts == nil) == (request.weights == nil) else {
            throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(layerName): expected experts and weights both or neither, found only \(request.experts == nil ? "weights" : "experts")")
        }
        guard (request.experts != nil) == withRouting else {
            throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(layerName): expected routing buffers for every layer or for none, found them for some")
        }
        if withRouting {
            let routingCount = try count(request.routing_count, role(i, "routing_count"))
            let expected = try product(tokens, slots, "routing")
            try checkBuffer(request.experts, as: Int32.self, count: routingCount, expected: expected, tokens: tokens, width: slots,
                            name: "\(layerName): \(role(i, "routing_count")) (experts)", writable: true, into: &extents)
            try checkBuffer(request.weights, as: Float.self, count: routingCount, expected: expected, tokens: tokens, width: slots,
                            name: "\(layerName): \(role(i, "routing_count")) (weights)", writable: true, into: &extents)
            experts.append(UnsafeMutableBufferPointer(start: request.experts, count: routingCount))
            weights.append(UnsafeMutableBufferPointer(start: request.weights, count: routingCount))
        }
    }
    // Buffers the call writes must not overlap each other or the input (the results would depend on the order of
    // the runtime's phases).
    for a in extents.indices {
        for b in extents.indices where b > a && (extents[a].writable || extents[b].writable) {
            if extents[a].start < extents[b].end && extents[b].start < extents[a].end {
                throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "buffers: expected no overlap, found \(extents[a].name) overlapping \(extents[b].name)")
            }
        }
    }
    try served.runtime.apply(entries.map(\.handle), input: UnsafeBufferPointer(start: input, count: inputCount), tokens: tokens, outputs: outputs,
                             experts: withRouting ? experts : nil, weights: withRouting ? weights : nil)
}
