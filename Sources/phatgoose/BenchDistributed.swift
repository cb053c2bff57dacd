import Foundation
import PhatgooseDistributed
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseRouting
import PhatgooseSynth

extension Bench {
    /// `bench --mpi`: one routed layer of the workload (W2 unless --workload or a custom one says otherwise), the
    /// distributed call over the MPI world against the local single-threaded call, at each of `--mpi-tokens`
    /// batch sizes. Every rank synthesises the same library; rank 0 reports.
    func timeDistributed() throws {
        var workloads = Workload.canonical.filter { workload.contains($0.name) }
        if let experts, let inWidth, let outWidth, let tokens {
            workloads.append(Workload(name: "custom", experts: experts, inWidth: inWidth, outWidth: outWidth, tokens: tokens, topK: topK, rank: rank))
        }
        let chosen = workloads.first ?? Workload.canonical.first { $0.name == "W2" }!
        let synth = chosen.synthOptions(dtype: DType(userSpelling: dtype)!)
        guard let world = try serveUnlessHost(memoryCap: nil, load: { try Synth.library(synth) }) else { return }
        try hostingMPI(world) {
            let library = try Synth.library(synth)
            let module = library.modules[0]
            let routing = RoutingOptions(topK: chosen.topK)
            let runtime = try DistributedRuntime(library: library, world: world, options: distributed.options(
                routing: routing, memoryCap: nil, experts: library.experts.count))
            let router = try LayerRouter(module: module, options: routing)
            let local = LayerExecutor()
            var rows: [JSONValue] = []
            if format == .text {
                print("workload \(chosen.name) (\(chosen.experts) experts, \(chosen.inWidth) -> \(chosen.outWidth), rank \(chosen.rank), top-\(chosen.topK)) over \(world.size) ranks")
                print("tokens  local us   mpi us  mpi/local  sent KB/call  identical")
            }
            for t in mpiTokens {
                // Sequences of 4 tokens, each leaning towards its own task: a batch mixes tasks as a served batch does.
                let x = Synth.activations(synth, layer: 0, tokens: t, sequenceLength: min(t, 4), seed: 1)
                var outLocal = [Float](repeating: 0, count: t * module.outWidth)
                var outMPI = [Float](repeating: 0, count: t * module.outWidth)
                var experts = [Int32](repeating: -1, count: t * router.slots)
                var weights = [Float](repeating: 0, count: t * router.slots)
                // Bits first, from zeroed outputs.
                local.apply(module, router: router, x: x, ldx: module.inWidth, tokens: t, out: &outLocal, ldo: module.outWidth)
                try runtime.apply(module: 0, input: x, tokens: t, output: &outMPI, experts: &experts, weights: &weights)
                let identical = outLocal.withUnsafeBytes { a in outMPI.withUnsafeBytes { b in a.elementsEqual(b) } }
                let localTimes = Self.time({ local.apply(module, router: router, x: x, ldx: module.inWidth, tokens: t, out: &outLocal, ldo: module.outWidth) },
                                           seconds: seconds)
                let sentBefore = runtime.statistics.bytesSent, callsBefore = runtime.statistics.calls
                let mpiTimes = try Self.time({ try runtime.apply(module: 0, input: x, tokens: t, output: &outMPI, experts: &experts, weights: &weights) },
                                             seconds: seconds)
                let after = runtime.statistics
                let sentPerCall = Double(after.bytesSent - sentBefore) / Double(max(1, after.calls - callsBefore))
                let localMedian = localTimes[localTimes.count / 2], mpiMedian = mpiTimes[mpiTimes.count / 2]
                rows.append(.object([
                    ("workload", .string(chosen.name)), ("tokens", .integer(t)), ("ranks", .integer(world.size)),
                    ("local_us_median", .double(localMedian * 1e6)), ("mpi_us_median", .double(mpiMedian * 1e6)),
                    ("local_us_p90", .double(localTimes[min(localTimes.count - 1, localTimes.count * 9 / 10)] * 1e6)),
                    ("mpi_us_p90", .double(mpiTimes[min(mpiTimes.count - 1, mpiTimes.count * 9 / 10)] * 1e6)),
                    ("mpi_over_local", .double(mpiMedian / localMedian)), ("bytes_sent_per_call", .double(sentPerCall)),
                    ("identical", .bool(identical)),
                ]))
                if format == .text {
                    print(String(format: "%6d  %8.1f  %7.1f  %9.2f  %12.1f  %@", t, localMedian * 1e6, mpiMedian * 1e6, mpiMedian / localMedian,
                                 sentPerCall / 1024, identical ? "yes" : "NO"))
                }
                guard identical else {
                    throw DistributedError(.shape, "bench --mpi: at \(t) tokens the distributed call's delta differs from the local call's")
                }
            }
            let shares = runtime.shares.map { share in
                JSONValue.object([("rank", .integer(share.rank)), ("resident_bytes", .integer(share.residentBytes)),
                                  ("experts", .integer(share.experts)), ("process_bytes", .integer(share.processBytes))])
            }
            if format == .json {
                print(JSONValue.object([("results", .array(rows)), ("ranks", .array(shares))]).serialized())
            } else {
                for share in runtime.shares {
                    print(String(format: "rank %d: %d experts, %.1f MiB of expert weights", share.rank, share.experts, Double(share.residentBytes) / 1048576))
                }
            }
            return ((), runtime)
        }
    }
}
