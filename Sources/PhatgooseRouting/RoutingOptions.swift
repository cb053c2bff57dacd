import PhatgooseLibrary

/// How tokens choose experts. Defaults come from the library's `routing`; options override them.
public struct RoutingOptions: Sendable, Equatable {
    /// Per token, or per sequence (the mean activation of a sequence routes all its tokens).
    public enum Granularity: Sendable, Equatable {
        /// Each token is routed by its own activation.
        case token
        /// Consecutive sequences of this many tokens; the last may be shorter.
        case sequence(length: Int)
    }

    /// Which router scores and chooses the experts.
    public var router: RouterKind
    /// Experts per token (k). Ignored by the uniform router, which takes every candidate.
    public var topK: Int
    /// Whether tokens are routed one by one or per sequence.
    public var granularity: Granularity
    /// Arrow: scores are |x . prototype| / temperature (the official default is 10).
    public var arrowTemperature: Float
    /// Arrow: also multiply scores by 1/sqrt(in).
    public var arrowScaled: Bool

    /// Creates options from their parts; the defaults are PHATGOOSE, top-2, per token, Arrow temperature 10,
    /// unscaled.
    public init(router: RouterKind = .phatgoose, topK: Int = 2, granularity: Granularity = .token,
                arrowTemperature: Float = 10, arrowScaled: Bool = false) {
        self.router = router
        self.topK = topK
        self.granularity = granularity
        self.arrowTemperature = arrowTemperature
        self.arrowScaled = arrowScaled
    }

    /// The library's defaults.
    public init(defaults: RoutingDefaults) {
        self.init(router: defaults.router, topK: defaults.topK)
    }

    /// Output slots per token at a module with `candidates` experts: k for top-k routers, every candidate for uniform.
    public func slotsPerToken(candidates: Int) -> Int {
        router == .uniform ? candidates : topK
    }
}

/// An error routing or applying a layer, naming the tensor or option at fault.
public struct RoutingError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is; extensible without breaking users.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's name, as printed in messages.
        public let name: String
        /// Creates a code with the given name.
        public init(_ name: String) { self.name = name }
        /// The code's name.
        public var description: String { name }
        /// An option is out of range.
        public static let option = Code("option")
        /// An input tensor does not fit the module it is keyed by.
        public static let input = Code("input")
    }

    /// What kind of failure this is.
    public let code: Code
    /// What is wrong: the tensor or option, what was expected and what was found.
    public let message: String

    /// Creates an error from its parts.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// The message.
    public var description: String { message }
}
