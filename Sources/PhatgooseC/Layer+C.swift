import CPhatgoose
import PhatgooseRuntime

// phatgoose_layer_*: see include/phatgoose.h. A layer handle names its runtime (by handle bits, checked by every
// apply) and holds the runtime's `LayerHandle`; destroying the runtime destroys its layers.

@c @implementation
public func phatgoose_layer_create(_ runtime: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ layer: UnsafeMutablePointer<OpaquePointer?>?) -> phatgoose_status {
    abiCall {
        let out = try required(layer, "layer")
        let served = try lookUpRuntime(runtime)
        let moduleName = try string(name, "name")
        try served.checkRunning()
        guard let handle = served.runtime.layer(named: moduleName) else {
            throw ABIError(PHATGOOSE_STATUS_NOT_FOUND, "layer \"\(moduleName)\": expected the name of a module of the library, found no module of that name")
        }
        let entry = LayerEntry(owner: handleBits(runtime), served: served, handle: handle)
        // The runtime may have been destroyed since it was looked up: register the layer only if it is still live,
        // so a destroyed runtime never gains layers.
        out.pointee = try handles.withLock { table throws(ABIError) in
            _ = try table.runtime(runtime)
            return try table.insert(.layer(entry))
        }
    }
}

@c @implementation
public func phatgoose_layer_destroy(_ layer: OpaquePointer?) -> phatgoose_status {
    abiCall {
        guard layer != nil else { return }
        let removed = try handles.withLock { table throws(ABIError) in try table.remove(layer, .layer) }
        _ = removed
    }
}

@c @implementation
public func phatgoose_layer_shape(_ layer: OpaquePointer?, _ inWidth: UnsafeMutablePointer<Int>?, _ outWidth: UnsafeMutablePointer<Int>?,
                                  _ slots: UnsafeMutablePointer<Int>?) -> phatgoose_status {
    abiCall {
        let entry = try handles.withLock { table throws(ABIError) in try table.layer(layer) }
        try entry.served.checkRunning()
        let widths = try entry.served.runtime.widths(of: entry.handle)
        let slotCount = try entry.served.runtime.slots(of: entry.handle)
        inWidth?.pointee = widths.inWidth
        outWidth?.pointee = widths.outWidth
        slots?.pointee = slotCount
    }
}
