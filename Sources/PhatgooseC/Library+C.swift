import CPhatgoose
import PhatgooseLibrary

// phatgoose_library_*: see include/phatgoose.h for each function's contract and thread safety. A library handle
// holds an `ExpertLibrary` value (immutable, shareable), so every getter may run concurrently with anything.

@c @implementation
public func phatgoose_library_open(_ path: UnsafePointer<CChar>?, _ library: UnsafeMutablePointer<OpaquePointer?>?) -> phatgoose_status {
    abiCall {
        let out = try required(library, "library")
        let loaded = try ExpertLibrary.load(path: try filePath(path, "path", naming: "a library (a directory or a packed file)"))
        out.pointee = try handles.withLock { table throws(ABIError) in try table.insert(.library(loaded)) }
    }
}

@c @implementation
public func phatgoose_library_destroy(_ library: OpaquePointer?) -> phatgoose_status {
    abiCall {
        guard library != nil else { return }
        // The value is released after the lock is dropped.
        let removed = try handles.withLock { table throws(ABIError) in try table.remove(library, .library) }
        _ = removed
    }
}

/// The library behind a handle.
private func lookUp(_ library: OpaquePointer?) throws(ABIError) -> ExpertLibrary {
    try handles.withLock { table throws(ABIError) in try table.library(library) }
}

@c @implementation
public func phatgoose_library_expert_count(_ library: OpaquePointer?, _ count: UnsafeMutablePointer<Int>?) -> phatgoose_status {
    abiCall {
        let loaded = try lookUp(library)
        try required(count, "count").pointee = loaded.experts.count
    }
}

@c @implementation
public func phatgoose_library_module_count(_ library: OpaquePointer?, _ count: UnsafeMutablePointer<Int>?) -> phatgoose_status {
    abiCall {
        let loaded = try lookUp(library)
        try required(count, "count").pointee = loaded.modules.count
    }
}

@c @implementation
public func phatgoose_library_expert_name(_ library: OpaquePointer?, _ index: Int, _ buffer: UnsafeMutablePointer<CChar>?, _ capacity: Int,
                                          _ length: UnsafeMutablePointer<Int>?) -> phatgoose_status {
    abiCall {
        let loaded = try lookUp(library)
        let i = try position(index, of: loaded.experts.count, "expert")
        try copyName(loaded.experts[i].name, into: buffer, capacity: capacity, length: length)
    }
}

@c @implementation
public func phatgoose_library_module_name(_ library: OpaquePointer?, _ index: Int, _ buffer: UnsafeMutablePointer<CChar>?, _ capacity: Int,
                                          _ length: UnsafeMutablePointer<Int>?) -> phatgoose_status {
    abiCall {
        let loaded = try lookUp(library)
        let i = try position(index, of: loaded.modules.count, "module")
        try copyName(loaded.modules[i].name, into: buffer, capacity: capacity, length: length)
    }
}

@c @implementation
public func phatgoose_library_module_widths(_ library: OpaquePointer?, _ index: Int, _ inWidth: UnsafeMutablePointer<Int>?,
                                            _ outWidth: UnsafeMutablePointer<Int>?) -> phatgoose_status {
    abiCall {
        let loaded = try lookUp(library)
        let module = loaded.modules[try position(index, of: loaded.modules.count, "module")]
        inWidth?.pointee = module.inWidth
        outWidth?.pointee = module.outWidth
    }
}

/// `index` (a `size_t`) checked against `count` items.
private func position(_ index: Int, of count: Int, _ noun: String) throws(ABIError) -> Int {
    guard index >= 0 && index < count else {
        throw ABIError(PHATGOOSE_STATUS_NOT_FOUND, "\(noun) index: expected 0 ..< \(count), found \(UInt(bitPattern: index))")
    }
    return index
}

/// Copies `name` and a NUL into `buffer[0 ..< capacity]`, or reports the size needed.
private func copyName(_ name: String, into buffer: UnsafeMutablePointer<CChar>?, capacity: Int, length: UnsafeMutablePointer<Int>?) throws(ABIError) {
    let bytes = Array(name.utf8)
    let room = capacity < 0 ? Int.max : capacity  // a size_t above Int.max is room enough
    guard room > bytes.count else {
        length?.pointee = bytes.count
        throw ABIError(PHATGOOSE_STATUS_BUFFER_TOO_SMALL, "name buffer: expected room for \(bytes.count + 1) bytes, found \(UInt(bitPattern: capacity))")
    }
    let out = try required(buffer, "buffer")
    for (i, byte) in bytes.enumerated() { out[i] = CChar(bitPattern: byte) }
    out[bytes.count] = 0
    length?.pointee = bytes.count
}
