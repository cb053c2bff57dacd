import ArgumentParser
import Foundation
import PhatgooseDistributed
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseRouting

/// Options of the commands that run over MPI (`--mpi`), shared by the host (rank 0) and the serving ranks.
struct DistributedFlags: ParsableArguments {
    @Flag(help: "Shard the experts over the ranks of the MPI world (start under mpirun; rank 0 is the host, the other ranks serve experts; docs/scale-out.md).")
    var mpi = false

    @Option(name: .customLong("mpi-timeout"), help: "With --mpi: most seconds to wait for a rank's answer before failing. (default: 30)")
    var mpiTimeout: Double = 30

    @Option(parsing: .unconditional, help: "With --mpi: the costliest experts (by --expert-load when given, else bytes) held by every rank.")
    var replicateHot: Int = 0

    @Option(help: "With --mpi: a JSON array of each expert's share of tokens (for example from a profile), to balance the ranks by load instead of bytes.")
    var expertLoad: String?

    func validate() throws {
        guard mpiTimeout.isFinite, mpiTimeout > 0 else { throw ValidationError("--mpi-timeout: expected a positive number of seconds, found \(mpiTimeout)") }
        guard replicateHot >= 0 else { throw ValidationError("--replicate-hot: expected at least 0, found \(replicateHot)") }
        if !mpi && (replicateHot != 0 || expertLoad != nil) { throw ValidationError("--replicate-hot and --expert-load: only with --mpi") }
    }

    /// Each expert's load from `--expert-load`, or nil.
    func load(experts: Int) throws -> [Double]? {
        guard let expertLoad else { return nil }
        let bytes: Data
        do { bytes = try Data(contentsOf: URL(fileURLWithPath: expertLoad)) } catch {
            throw DistributedError(.option, "\(expertLoad): expected a readable JSON file, found it unreadable (\(error.localizedDescription))")
        }
        let value: JSONValue
        do { value = try JSONParser.parse([UInt8](bytes)) } catch {
            throw DistributedError(.option, "\(expertLoad): expected a JSON array of numbers, found invalid JSON (\(error))")
        }
        guard case let .array(items) = value else { throw DistributedError(.option, "\(expertLoad): expected a JSON array of numbers, found another value") }
        let numbers = items.compactMap { item -> Double? in
            guard case let .number(n) = item else { return nil }
            return Double(n.text)
        }
        guard numbers.count == items.count else { throw DistributedError(.option, "\(expertLoad): expected a JSON array of numbers, found a non-number") }
        guard numbers.count == experts else {
            throw DistributedError(.option, "\(expertLoad): expected one value per expert (\(experts)), found \(numbers.count)")
        }
        return numbers
    }

    func options(routing: RoutingOptions, memoryCap: Int?, experts: Int) throws -> DistributedOptions {
        DistributedOptions(routing: routing, memoryCapBytes: memoryCap, expertLoad: try load(experts: experts), replicateHot: replicateHot,
                           timeoutSeconds: mpiTimeout)
    }
}

/// Runs a command over MPI: on a rank other than 0, serves experts from `library` until rank 0 stops and returns
/// nil (the command has nothing more to do there); on rank 0, returns the world for the host's work. The caller
/// hands rank 0's work to ``hostingMPI(_:_:)``.
func serveUnlessHost(library path: String, memoryCap: Int?) throws -> MPIWorld? {
    try serveUnlessHost(memoryCap: memoryCap) { try ExpertLibrary.load(path: path) }
}

/// The same for a library that `load` makes (every rank makes the same one).
func serveUnlessHost(memoryCap: Int?, load: () throws -> ExpertLibrary) throws -> MPIWorld? {
    let world = try MPIWorld.initialize()
    guard world.rank != 0 else { return world }
    do {
        _ = try ExpertServer.serve(world: world, memoryCapBytes: memoryCap, load: load)
    } catch {
        printError("phatgoose: \(error)")
        world.abort(code: 1)
    }
    world.finalize()
    return nil
}

/// Rank 0's side of an MPI command: runs `body`, then stops the serving ranks and finalises MPI. When `body`
/// fails, the serving ranks are stopped too and the error is rethrown; when a rank timed out or MPI itself failed
/// (the world cannot end in order), the error is printed and the whole job aborted with exit code 1.
func hostingMPI<T>(_ world: MPIWorld, _ body: () throws -> (T, DistributedRuntime?)) throws -> T {
    let runtime: DistributedRuntime?
    let value: T
    do {
        (value, runtime) = try body()
    } catch let error as DistributedError where error.code == .timeout || error.code == .mpi {
        printError("phatgoose: \(error.message)")
        world.abort(code: 1)
    } catch {
        if world.isBroken {
            printError("phatgoose: \(String(describing: error).split(separator: "\n").joined(separator: " "))")
            world.abort(code: 1)
        }
        ExpertServer.stopAll(world: world)
        world.finalize()
        throw error
    }
    if world.isBroken {
        printError("phatgoose: \(runtime?.failure?.message ?? "a rank failed"); ending every rank")
        world.abort(code: 1)
    }
    runtime?.shutdown()
    if runtime == nil { ExpertServer.stopAll(world: world) }
    world.finalize()
    return value
}

struct ServeExperts: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-experts",
        abstract: "Serve a share of a library's experts to rank 0 of an MPI world, until it stops.",
        discussion: """
            For a host that is not itself phatgoose (or to give the serving ranks their own paths): \
            mpirun -np 1 HOST ... : -np 3 phatgoose serve-experts --library L. Rank 0 places the experts; each \
            serving rank copies its share of L (which must be the same library as rank 0's), runs the assignments \
            rank 0 sends it and returns their rows. See docs/scale-out.md.
            """
    )

    @Option(help: "The library (the same as rank 0's), as a directory or packed file on this machine.")
    var library: String

    @Option(parsing: .unconditional, help: "Most bytes of expert weights this rank may hold (rank 0's cap applies too).")
    var memoryCap: Int?

    func validate() throws {
        if let memoryCap, memoryCap < 0 { throw ValidationError("--memory-cap: expected at least 0, found \(memoryCap)") }
    }

    func run() throws {
        let world = try MPIWorld.initialize()
        guard world.rank != 0 else {
            ExpertServer.stopAll(world: world)
            world.finalize()
            throw DistributedError(.option, "serve-experts: expected a rank other than 0, found rank 0 (rank 0 is the host that routes: mpirun -np 1 phatgoose apply --mpi ... : -np 3 phatgoose serve-experts --library L)")
        }
        _ = try serveUnlessHost(library: library, memoryCap: memoryCap)
    }
}
