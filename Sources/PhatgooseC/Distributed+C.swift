import CPhatgoose
import PhatgooseDistributed
import PhatgooseLibrary
import PhatgooseRouting

// phatgoose_distributed_* and phatgoose_mpi_available: see include/phatgoose.h for each function's contract and
// thread safety. `DistributedRuntime` serves calls from any thread one at a time; the handle table keeps it alive
// for as long as a call that looked it up is running.

private func lookUpDistributed(_ runtime: OpaquePointer?) throws(ABIError) -> DistributedRuntime {
    try handles.withLock { table throws(ABIError) in try table.distributed(runtime) }
}

@c @implementation
public func phatgoose_mpi_available() -> Int32 { MPIWorld.isAvailable ? 1 : 0 }

@c @implementation
public func phatgoose_distributed_open(_ path: UnsafePointer<CChar>?, _ topK: Int, _ memoryCapBytes: UInt64, _ replicateHot: Int,
                                       _ timeoutSeconds: Double, _ runtime: UnsafeMutablePointer<OpaquePointer?>?) -> phatgoose_status {
    abiCall {
        let out = try required(runtime, "runtime")
        let file = try filePath(path, "path", naming: "a library (a directory or a packed file)")
        let k = try count(topK, "top_k"), replicas = try count(replicateHot, "replicate_hot")
        guard memoryCapBytes <= UInt64(Int.max) else {
            throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "memory_cap_bytes: expected at most \(Int.max), found \(memoryCapBytes)")
        }
        guard !timeoutSeconds.isNaN else { throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "timeout_seconds: expected a number, found NaN") }
        let world = try MPIWorld.initialize()
        guard world.rank == 0 else {
            throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "phatgoose_distributed_open: expected rank 0 (the host), found rank \(world.rank): run phatgoose serve-experts --library L on the other ranks")
        }
        let made: DistributedRuntime
        do {
            let library = try ExpertLibrary.load(path: file)
            var routing = RoutingOptions(defaults: library.routing)
            if k > 0 { routing.topK = k }
            made = try DistributedRuntime(library: library, world: world, options: DistributedOptions(
                routing: routing, memoryCapBytes: memoryCapBytes == 0 ? nil : Int(memoryCapBytes), replicateHot: replicas,
                timeoutSeconds: timeoutSeconds > 0 && timeoutSeconds.isFinite ? timeoutSeconds : 30))
        } catch {
            // The serving ranks wait for a hello or have been told to stop: let them go.
            ExpertServer.stopAll(world: world)
            throw error
        }
        do {
            out.pointee = try handles.withLock { table throws(ABIError) in try table.insert(.distributed(made)) }
        } catch {
            made.shutdown()
            throw error
        }
    }
}

@c @implementation
public func phatgoose_distributed_destroy(_ runtime: OpaquePointer?) -> phatgoose_status {
    abiCall {
        guard runtime != nil else { return }
        let removed = try handles.withLock { table throws(ABIError) in try table.remove(runtime, .distributed) }
        guard case let .distributed(served) = removed else { return }
        if served.world.isBroken {
            pg_abi_set_last_error("phatgoose_distributed_destroy: \(served.failure?.message ?? "a rank failed"); ending every rank")
            served.world.abort(code: 1)
        }
        served.shutdown()
        served.world.finalize()
    }
}

@c @implementation
public func phatgoose_distributed_rank_count(_ runtime: OpaquePointer?, _ ranks: UnsafeMutablePointer<Int>?) -> phatgoose_status {
    abiCall {
        let out = try required(ranks, "ranks")
        out.pointee = try lookUpDistributed(runtime).shares.count
    }
}

@c @implementation
public func phatgoose_distributed_rank_share(_ runtime: OpaquePointer?, _ rank: Int, _ residentBytes: UnsafeMutablePointer<UInt64>?,
                                             _ experts: UnsafeMutablePointer<Int>?) -> phatgoose_status {
    abiCall {
        let shares = try lookUpDistributed(runtime).shares
        guard rank >= 0 && rank < shares.count else {
            throw ABIError(PHATGOOSE_STATUS_NOT_FOUND, "rank: expected 0 to \(shares.count - 1), found \(UInt(bitPattern: rank))")
        }
        residentBytes?.pointee = UInt64(shares[rank].residentBytes)
        experts?.pointee = shares[rank].experts
    }
}

@c @implementation
public func phatgoose_distributed_module(_ runtime: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ index: UnsafeMutablePointer<Int>?,
                                         _ inWidth: UnsafeMutablePointer<Int>?, _ outWidth: UnsafeMutablePointer<Int>?,
                                         _ slots: UnsafeMutablePointer<Int>?) -> phatgoose_status {
    abiCall {
        let served = try lookUpDistributed(runtime)
        let moduleName = try string(name, "name")
        guard let m = served.module(named: moduleName) else {
            throw ABIError(PHATGOOSE_STATUS_NOT_FOUND, "name: expected a module of the library, found '\(moduleName)'")
        }
        let widths = served.widths(ofModule: m)
        index?.pointee = m
        inWidth?.pointee = widths.inWidth
        outWidth?.pointee = widths.outWidth
        slots?.pointee = served.slots(ofModule: m)
    }
}

@c @implementation
public func phatgoose_distributed_apply(_ runtime: OpaquePointer?, _ module: Int, _ input: UnsafePointer<Float>?, _ tokens: Int,
                                        _ inputCount: Int, _ output: UnsafeMutablePointer<Float>?, _ outputCount: Int,
                                        _ experts: UnsafeMutablePointer<Int32>?, _ weights: UnsafeMutablePointer<Float>?,
                                        _ routingCount: Int) -> phatgoose_status {
    abiCall {
        let served = try lookUpDistributed(runtime)
        guard module >= 0 && module < served.moduleNames.count else {
            throw ABIError(PHATGOOSE_STATUS_NOT_FOUND, "module: expected an index 0 to \(served.moduleNames.count - 1), found \(UInt(bitPattern: module))")
        }
        let t = try count(tokens, "tokens")
        let (inWidth, outWidth) = served.widths(ofModule: module)
        let slots = served.slots(ofModule: module)
        let (n, overflowIn) = t.multipliedReportingOverflow(by: inWidth)
        let (o, overflowOut) = t.multipliedReportingOverflow(by: outWidth)
        let (r, overflowRouting) = t.multipliedReportingOverflow(by: slots)
        guard !overflowIn, !overflowOut, !overflowRouting else { throw ABIError(PHATGOOSE_STATUS_SHAPE, "tokens: \(t) is too many for any buffer") }
        guard inputCount == n else { throw ABIError(PHATGOOSE_STATUS_SHAPE, "input_count: expected \(n) (tokens \(t) x in \(inWidth)), found \(inputCount)") }
        guard outputCount == o else { throw ABIError(PHATGOOSE_STATUS_SHAPE, "output_count: expected \(o) (tokens \(t) x out \(outWidth)), found \(outputCount)") }
        guard (experts == nil) == (weights == nil) else {
            throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "experts and weights: expected both or neither, found one")
        }
        if experts != nil, routingCount != r {
            throw ABIError(PHATGOOSE_STATUS_SHAPE, "routing_count: expected \(r) (tokens \(t) x slots \(slots)), found \(routingCount)")
        }
        guard t > 0 else { return }
        let x = try required(UnsafeMutablePointer(mutating: input), "input")
        let y = try required(output, "output")
        // The runtime always writes the choices; without the caller's buffers they go to scratch.
        var scratchExperts = experts == nil ? [Int32](repeating: -1, count: r) : []
        var scratchWeights = weights == nil ? [Float](repeating: 0, count: r) : []
        try scratchExperts.withUnsafeMutableBufferPointer { e in
            try scratchWeights.withUnsafeMutableBufferPointer { w in
                try served.apply(module: module, input: UnsafePointer(x), tokens: t, output: y,
                                 experts: experts ?? e.baseAddress!, weights: weights ?? w.baseAddress!)
            }
        }
    }
}
