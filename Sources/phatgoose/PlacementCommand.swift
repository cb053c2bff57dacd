import ArgumentParser
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseRuntime

/// Options that choose the runtime's executor, workers, topology and placement.
struct RuntimeFlags: ParsableArguments {
    @Option(parsing: .unconditional, help: "Worker threads besides the caller (default: CPUs - 1).")
    var workers: Int?

    @Option(help: "Executor: pinned or dispatch.")
    var executor: String = "pinned"

    @Option(help: "Model a NUMA topology instead of detecting it: CPU lists per node, e.g. \"0;1\" or \"0-3;4-7\".")
    var topology: String?

    @Option(help: "Placement: distribute, isolate:NODE, replicate:COUNT, or in-place.")
    var placement: String = "distribute"

    @Option(parsing: .unconditional, help: "Memory cap on expert weights, in bytes.")
    var memoryCap: Int?

    @Option(parsing: .unconditional, help: "Most tokens of one call in one dispatch; a larger call is served in chunks. (default: 256)")
    var chunkTokens: Int?

    @Option(parsing: .unconditional, help: "Most tokens of one dispatch, over all the calls it merges; 0: no bound. (default: 512)")
    var dispatchTokens: Int?

    @Option(parsing: .unconditional, help: "Dispatch lanes: how many dispatches may run at once, each on its caller alone while another runs. (default: workers + 1; 1: one at a time)")
    var lanes: Int?

    @Option(parsing: .unconditional, help: "Dispatches of fewer tokens run on the caller alone, waking no worker. (default: 1)")
    var parallelMinTokens: Int?

    @Option(parsing: .unconditional, help: "While a worker was seen preempted, dispatches of fewer tokens run on the caller alone; 0: off. (default: 64)")
    var contendedMinTokens: Int?

    @Option(name: .customLong("spin-us"), parsing: .unconditional, help: "Microseconds an idle pinned worker spins before it sleeps; 0: it sleeps at once. (default: 50)")
    var spinMicroseconds: Int?

    func validate() throws {
        guard ExecutorKind(rawValue: executor) != nil else { throw ValidationError("--executor: expected pinned or dispatch, found \(executor)") }
        _ = try placementPolicy()
        if let workers, workers < 0 { throw ValidationError("--workers: expected at least 0, found \(workers)") }
        if let chunkTokens, chunkTokens < 1 { throw ValidationError("--chunk-tokens: expected at least 1, found \(chunkTokens)") }
        if let dispatchTokens, dispatchTokens < 0 { throw ValidationError("--dispatch-tokens: expected at least 0 (0: no bound), found \(dispatchTokens)") }
        if let lanes, lanes < 1 { throw ValidationError("--lanes: expected at least 1, found \(lanes)") }
        if let parallelMinTokens, parallelMinTokens < 1 { throw ValidationError("--parallel-min-tokens: expected at least 1, found \(parallelMinTokens)") }
        if let contendedMinTokens, contendedMinTokens < 0 { throw ValidationError("--contended-min-tokens: expected at least 0 (0: off), found \(contendedMinTokens)") }
        if let spinMicroseconds, spinMicroseconds < 0 { throw ValidationError("--spin-us: expected at least 0, found \(spinMicroseconds)") }
    }

    func placementPolicy() throws -> PlacementPolicy {
        let parts = placement.split(separator: ":", maxSplits: 1).map(String.init)
        switch (parts.first, parts.count) {
        case ("distribute"?, 1): return .distribute
        case ("in-place"?, 1): return .inPlace
        case ("isolate"?, 2): if let node = Int(parts[1]) { return .isolate(node: node) }
        case ("replicate"?, 2): if let count = Int(parts[1]) { return .replicateHot(count: count) }
        default: break
        }
        throw ValidationError("--placement: expected distribute, isolate:NODE, replicate:COUNT or in-place, found \(placement)")
    }

    func options(routing: RoutingFlags? = nil, defaults: RoutingDefaults) throws -> RuntimeOptions {
        var options = RuntimeOptions(routing: routing?.options(defaults: defaults, tokens: 0), workers: workers, executor: ExecutorKind(rawValue: executor)!,
                                     topology: try topology.map { try Topology.modelled($0) }, placement: try placementPolicy(), memoryCapBytes: memoryCap)
        if let chunkTokens { options.chunkTokens = chunkTokens }
        if let dispatchTokens { options.dispatchTokens = dispatchTokens == 0 ? nil : dispatchTokens }
        options.lanes = lanes
        if let parallelMinTokens { options.parallelMinTokens = parallelMinTokens }
        if let contendedMinTokens { options.contendedMinTokens = contendedMinTokens }
        if let spinMicroseconds { options.spinMicroseconds = spinMicroseconds }
        return options
    }
}

struct PlacementCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "placement",
        abstract: "Place a library's experts on NUMA nodes and report where the kernel really put each shard's pages.",
        discussion: "Asks the kernel (move_pages) for the node of every page of each node's shard memory, next to the node it was bound to."
    )

    @Argument(help: "A library directory or packed library.")
    var library: String

    @OptionGroup var runtimeFlags: RuntimeFlags

    @Option(help: "Output format: text or json.")
    var format: OutputFormat = .text

    func run() throws {
        let loaded = try ExpertLibrary.load(path: library)
        let runtime = try Runtime(library: loaded, options: runtimeFlags.options(defaults: loaded.routing))
        defer { runtime.shutdown() }
        let report = runtime.placementReport()
        let workers = (1..<runtime.participants).map { p -> JSONValue in
            .object([("participant", .integer(p)), ("node", .integer(runtime.participantNodes[p])),
                     ("cpu", runtime.participantCPUs[p].map { .integer($0) } ?? .null)])
        }
        let shards: [JSONValue] = report.map { shard in
            let onTarget = shard.pagesByNode[shard.memoryNode] ?? 0
            let sampled = shard.pagesByNode.values.reduce(0, +)
            return .object([
                ("node", .integer(shard.node)), ("bound_to_memory_node", .integer(shard.memoryNode)), ("bytes", .integer(shard.bytes)),
                ("experts", .array(shard.experts.map { .string($0) })),
                ("pages_sampled", .integer(sampled)), ("pages_on_bound_node", .integer(onTarget)),
                ("pages_by_node", .object(shard.pagesByNode.sorted { $0.key < $1.key }.map { (String($0.key), JSONValue.integer($0.value)) })),
            ])
        }
        switch format {
        case .json:
            print(JSONValue.object([("topology", .string(runtime.topology.description)), ("numa_available", .bool(Topology.canBindMemory)),
                                    ("workers", .array(workers)), ("shards", .array(shards))]).serialized())
        case .text:
            print("topology: \(runtime.topology.description)\(Topology.canBindMemory ? "" : " (libnuma unavailable: memory not bound)")")
            for p in 1..<runtime.participants {
                print("worker \(p): node \(runtime.participantNodes[p]), cpu \(runtime.participantCPUs[p].map(String.init) ?? "unpinned")")
            }
            for shard in report {
                let sampled = shard.pagesByNode.values.reduce(0, +)
                let where_ = shard.pagesByNode.sorted { $0.key < $1.key }.map { "\($0.value) on node \($0.key)" }.joined(separator: ", ")
                print("shard of node \(shard.node): \(shard.experts.count) experts, \(LibraryReport.formatBytes(shard.bytes)), bound to memory node \(shard.memoryNode); pages sampled \(sampled): \(where_)")
            }
        }
    }
}
