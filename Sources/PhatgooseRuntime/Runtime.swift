import PhatgooseLibrary
import PhatgooseRouting

/// A handle to one routed layer of a ``Runtime``, resolved once from its module name.
public struct LayerHandle: Hashable, Sendable {
    public let index: Int
    public let name: String
}

/// An opened expert library ready to serve: resolve layer names to handles once, then apply layers from any number
/// of threads at once.
///
/// # Thread safety
/// The library and routers are immutable after `init`; every call takes its own executor (scratch) from a
/// mutex-protected pool, so concurrent calls share nothing mutable.
public final class Runtime: Sendable {
    public let library: ExpertLibrary
    public let options: RoutingOptions
    private let routers: [LayerRouter]
    private let executors = ExecutorPool()

    /// Opens `library` with `options` (the library's routing defaults when nil).
    public init(library: ExpertLibrary, options: RoutingOptions? = nil) throws {
        self.library = library
        let options = options ?? RoutingOptions(defaults: library.routing)
        self.options = options
        routers = try library.modules.map { try LayerRouter(module: $0, options: options) }
    }

    /// The handle of the module named `name`, or nil.
    public func layer(named name: String) -> LayerHandle? {
        library.moduleIndex(of: name).map { LayerHandle(index: $0, name: name) }
    }

    /// Adds the mixture delta of `layer` for `tokens` rows of `input` ([tokens, in], row-major) into `output`
    /// ([tokens, out]). When `routing` is given, it receives each token's expert indices and weights ([tokens, k]).
    public func apply(_ layer: LayerHandle, input: UnsafeBufferPointer<Float>, tokens: Int,
                      output: UnsafeMutableBufferPointer<Float>,
                      routing: ((_ experts: [Int32], _ weights: [Float]) -> Void)? = nil) {
        let module = library.modules[layer.index]
        precondition(input.count >= tokens * module.inWidth, "input holds \(input.count) floats, expected \(tokens) x \(module.inWidth)")
        precondition(output.count >= tokens * module.outWidth, "output holds \(output.count) floats, expected \(tokens) x \(module.outWidth)")
        guard tokens > 0 else { return }
        executors.withExecutor { executor in
            executor.apply(module, router: routers[layer.index], x: input.baseAddress!, ldx: module.inWidth, tokens: tokens,
                           out: output.baseAddress!, ldo: module.outWidth)
            if let routing {
                let chosen = executor.routing.candidates.map { $0 < 0 ? -1 : module.experts[Int($0)].expert.rawValue }
                routing(chosen, executor.routing.weights)
            }
        }
    }
}
