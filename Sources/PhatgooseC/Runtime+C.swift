import CPhatgoose
import PhatgooseLibrary
import PhatgooseRuntime

// phatgoose_runtime_* (lifecycle, experts, statistics): see include/phatgoose.h for each function's contract and
// thread safety. `Runtime` is safe to call from any thread; the handle table keeps a runtime alive for as long as a
// call that looked it up is running.

/// The runtime behind a handle.
func lookUpRuntime(_ runtime: OpaquePointer?) throws(ABIError) -> ServedRuntime {
    try handles.withLock { table throws(ABIError) in try table.runtime(runtime) }
}

/// Serves `library` and stores the new handle in `out`.
private func serve(_ library: ExpertLibrary, options: UnsafePointer<phatgoose_runtime_options>?,
                   into out: UnsafeMutablePointer<OpaquePointer?>) throws {
    let served = ServedRuntime(try Runtime(library: library, options: runtimeOptions(options, library: library)))
    do {
        out.pointee = try handles.withLock { table throws(ABIError) in try table.insert(.runtime(served)) }
    } catch {
        served.runtime.shutdown()
        throw error
    }
}

@c @implementation
public func phatgoose_runtime_create(_ library: OpaquePointer?, _ options: UnsafePointer<phatgoose_runtime_options>?,
                                     _ runtime: UnsafeMutablePointer<OpaquePointer?>?) -> phatgoose_status {
    abiCall {
        let out = try required(runtime, "runtime")
        let loaded = try handles.withLock { table throws(ABIError) in try table.library(library) }
        try serve(loaded, options: options, into: out)
    }
}

@c @implementation
public func phatgoose_runtime_open(_ path: UnsafePointer<CChar>?, _ options: UnsafePointer<phatgoose_runtime_options>?,
                                   _ runtime: UnsafeMutablePointer<OpaquePointer?>?) -> phatgoose_status {
    abiCall {
        let out = try required(runtime, "runtime")
        try serve(try ExpertLibrary.load(path: try filePath(path, "path", naming: "a library (a directory or a packed file)")), options: options, into: out)
    }
}

@c @implementation
public func phatgoose_runtime_shutdown(_ runtime: OpaquePointer?) -> phatgoose_status {
    abiCall {
        let served = try lookUpRuntime(runtime)
        served.isShutDown.store(true, ordering: .releasing)
        served.runtime.shutdown()
    }
}

@c @implementation
public func phatgoose_runtime_destroy(_ runtime: OpaquePointer?) -> phatgoose_status {
    abiCall {
        guard runtime != nil else { return }
        let removed = try handles.withLock { table throws(ABIError) -> HandleObject in
            let object = try table.remove(runtime, .runtime)
            table.removeLayers(of: handleBits(runtime))
            return object
        }
        // Outside the lock: shutting down waits for a call in progress.
        if case let .runtime(served) = removed {
            served.isShutDown.store(true, ordering: .releasing)
            served.runtime.shutdown()
        }
    }
}

@c @implementation
public func phatgoose_runtime_library(_ runtime: OpaquePointer?, _ library: UnsafeMutablePointer<OpaquePointer?>?) -> phatgoose_status {
    abiCall {
        let out = try required(library, "library")
        let served = try lookUpRuntime(runtime)
        let current = served.runtime.library
        out.pointee = try handles.withLock { table throws(ABIError) in try table.insert(.library(current)) }
    }
}

@c @implementation
public func phatgoose_runtime_add_expert(_ runtime: OpaquePointer?, _ directory: UnsafePointer<CChar>?, _ name: UnsafePointer<CChar>?,
                                         _ index: UnsafeMutablePointer<Int32>?) -> phatgoose_status {
    abiCall {
        let served = try lookUpRuntime(runtime)
        let path = try filePath(directory, "directory", naming: "an expert directory")
        let expertName = try string(name, "name")
        guard !expertName.isEmpty else { throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "name: expected an expert name, found an empty string") }
        try served.checkRunning()
        let added = try served.runtime.addExpert(directory: path, name: expertName)
        index?.pointee = added.rawValue
    }
}

@c @implementation
public func phatgoose_runtime_remove_expert(_ runtime: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> phatgoose_status {
    abiCall {
        let served = try lookUpRuntime(runtime)
        let expertName = try string(name, "name")
        try served.checkRunning()
        try served.runtime.removeExpert(named: expertName)
    }
}

@c @implementation
public func phatgoose_runtime_statistics(_ runtime: OpaquePointer?, _ calls: UnsafeMutablePointer<UInt64>?, _ tokens: UnsafeMutablePointer<UInt64>?,
                                         _ rejected: UnsafeMutablePointer<UInt64>?, _ tokensPerExpert: UnsafeMutablePointer<UInt64>?,
                                         _ capacity: Int, _ expertCount: UnsafeMutablePointer<Int>?) -> phatgoose_status {
    abiCall {
        let served = try lookUpRuntime(runtime)
        let snapshot = served.runtime.statisticsSnapshot()
        let perExpert = snapshot.tokensPerExpert
        expertCount?.pointee = perExpert.count
        if let tokensPerExpert {
            let room = capacity < 0 ? Int.max : capacity
            guard room >= perExpert.count else {
                throw ABIError(PHATGOOSE_STATUS_BUFFER_TOO_SMALL, "tokens_per_expert: expected room for \(perExpert.count) counts, found \(capacity)")
            }
            for (e, n) in perExpert.enumerated() { tokensPerExpert[e] = UInt64(n) }
        }
        calls?.pointee = UInt64(snapshot.calls)
        tokens?.pointee = UInt64(snapshot.tokens)
        rejected?.pointee = UInt64(snapshot.rejected)
    }
}
