import PhatgooseFormats

/// The parts of a Hugging Face PEFT `adapter_config.json` (LoRA) that decide what an expert computes.
///
/// Load rules:
/// 1. The file is strict JSON and its root an object. Unknown fields are ignored; known fields of the wrong type
///    are refused.
/// 2. `peft_type`, when present, must be `"LORA"`.
/// 3. `r` (default 8, as in PEFT) must be an integer >= 1; `lora_alpha` (default 8) a finite number;
///    `use_rslora` and `fan_in_fan_out` booleans (default false).
/// 4. `rank_pattern` maps patterns to integer ranks >= 1, `alpha_pattern` patterns to numbers. A module takes the
///    value of the first key, in file order, for which `(.*\.)?(KEY)$` matches the whole module name (PEFT's rule);
///    otherwise the global `r` / `lora_alpha`.
/// 5. `target_modules` is null, a list of names (a module matches a name it equals or ends with `.NAME`), a regular
///    expression that must match the whole module name, or `"all-linear"`.
/// 6. Things the runtime would silently ignore are refused: `use_dora: true`, `bias` other than `"none"`, and a
///    non-empty `modules_to_save`.
/// 7. `fan_in_fan_out` only says how PEFT would merge the delta into a Conv1D base weight; `lora_A` is `[r, in]`
///    and `lora_B` `[out, r]` either way, so it does not change what is computed. It is recorded and reported.
public struct AdapterConfig: Sendable {
    /// How `target_modules` selects modules.
    public enum TargetModules: Sendable, Equatable {
        /// `target_modules` is absent or null; every module is selected.
        case unspecified
        /// `"all-linear"`; every module is selected.
        case allLinear
        /// A list of names; a module matches a name it equals or ends with `.NAME`.
        case names([String])
        /// A regular expression that must match the whole module name.
        case pattern(String)
    }

    /// The global rank `r` (default 8), used where no `rank_pattern` key matches.
    public var rank: Int
    /// The global `lora_alpha` (default 8), used where no `alpha_pattern` key matches.
    public var alpha: Double
    /// `use_rslora`: when true the scale is alpha / sqrt(r) instead of alpha / r.
    public var useRSLoRA: Bool
    /// `fan_in_fan_out`, recorded and reported only; it does not change what is computed (load rule 7).
    public var fanInFanOut: Bool
    /// Which modules `target_modules` selects.
    public var targetModules: TargetModules
    /// `rank_pattern` entries in file order.
    public var rankPattern: [(pattern: String, rank: Int)]
    /// `alpha_pattern` entries in file order.
    public var alphaPattern: [(pattern: String, alpha: Double)]
    /// The whole document, kept for packing and reporting.
    public var document: JSONValue

    /// Parses and validates a config document. `file` names it in errors.
    public init(document: JSONValue, file: String) throws(LibraryError) {
        func failure(_ field: String, _ message: String) -> LibraryError {
            LibraryError(.config, file: file, subject: "field \"\(field)\"", message)
        }
        guard case .object = document else {
            throw LibraryError(.config, file: file, "expected a JSON object, found \(document.kindDescription)")
        }
        self.document = document
        func number(_ field: String, _ value: JSONValue) throws(LibraryError) -> Double {
            guard case let .number(n) = value, n.double.isFinite else {
                throw failure(field, "expected a finite number, found \(value.kindDescription)")
            }
            return n.double
        }
        func positiveInteger(_ field: String, _ value: JSONValue) throws(LibraryError) -> Int {
            guard case let .number(n) = value, let v = n.int64 else {
                throw failure(field, "expected an integer, found \(value.kindDescription)")
            }
            guard v >= 1, v <= Int64(Int32.max) else { throw failure(field, "expected a rank >= 1, found \(v)") }
            return Int(v)
        }
        func boolean(_ field: String, default defaultValue: Bool) throws(LibraryError) -> Bool {
            guard let value = document[field], value != .null else { return defaultValue }
            guard case let .bool(b) = value else { throw failure(field, "expected true or false, found \(value.kindDescription)") }
            return b
        }

        if let value = document["peft_type"], value != .null {
            guard case let .string(type) = value else { throw failure("peft_type", "expected a string, found \(value.kindDescription)") }
            guard type == "LORA" else { throw failure("peft_type", "expected \"LORA\", found \"\(type)\"") }
        }
        rank = try document["r"].map { v throws(LibraryError) in try positiveInteger("r", v) } ?? 8
        alpha = try document["lora_alpha"].map { v throws(LibraryError) in try number("lora_alpha", v) } ?? 8
        useRSLoRA = try boolean("use_rslora", default: false)
        fanInFanOut = try boolean("fan_in_fan_out", default: false)
        if try boolean("use_dora", default: false) {
            throw failure("use_dora", "expected false, found true: DoRA magnitude vectors are not part of PHATGOOSE routing and would be ignored")
        }
        if let value = document["bias"], value != .null {
            guard case let .string(bias) = value else { throw failure("bias", "expected a string, found \(value.kindDescription)") }
            guard bias == "none" else { throw failure("bias", "expected \"none\", found \"\(bias)\": LoRA biases would be ignored") }
        }
        if let value = document["modules_to_save"], value != .null {
            guard case let .array(items) = value else { throw failure("modules_to_save", "expected null or a list, found \(value.kindDescription)") }
            guard items.isEmpty else { throw failure("modules_to_save", "expected null or an empty list, found \(items.count) modules: fully fine-tuned modules would be ignored") }
        }
        switch document["target_modules"] {
        case nil, .null?:
            targetModules = .unspecified
        case let .string(text)?:
            if text == "all-linear" {
                targetModules = .allLinear
            } else {
                guard (try? Regex(text)) != nil else { throw failure("target_modules", "expected a valid regular expression, found \"\(text)\"") }
                targetModules = .pattern(text)
            }
        case let .array(items)?:
            var names: [String] = []
            for item in items {
                guard case let .string(name) = item else { throw failure("target_modules", "expected a list of strings, found an element that is \(item.kindDescription)") }
                names.append(name)
            }
            targetModules = .names(names)
        case let other?:
            throw failure("target_modules", "expected null, a string or a list of strings, found \(other.kindDescription)")
        }
        rankPattern = []
        alphaPattern = []
        for (field, isRank) in [("rank_pattern", true), ("alpha_pattern", false)] {
            guard let value = document[field], value != .null else { continue }
            guard case let .object(members) = value else { throw failure(field, "expected a map of patterns to values, found \(value.kindDescription)") }
            for (pattern, entry) in members {
                guard (try? Regex("(?:.*\\.)?(?:\(pattern))")) != nil else {
                    throw failure(field, "expected valid regular-expression keys, found \"\(pattern)\"")
                }
                if isRank {
                    rankPattern.append((pattern, try positiveInteger("\(field)\" key \"\(pattern)", entry)))
                } else {
                    alphaPattern.append((pattern, try number("\(field)\" key \"\(pattern)", entry)))
                }
            }
        }
    }

    /// Reads `path`.
    public init(path: String) throws {
        let file = try MappedFile(path: path)
        let document: JSONValue
        do {
            document = try JSONParser.parse(file.bytes)
        } catch {
            throw LibraryError(.config, file: path, "expected JSON, found invalid JSON (\(error))")
        }
        try self.init(document: document, file: path)
    }

    /// PEFT's pattern rule: the first key whose `(.*\.)?(KEY)$` matches the whole module name.
    static func firstMatch<T>(_ patterns: [(String, T)], module: String) -> T? {
        for (pattern, value) in patterns {
            if let regex = try? Regex("(?:.*\\.)?(?:\(pattern))"), (try? regex.wholeMatch(in: module)) != nil {
                return value
            }
        }
        return nil
    }

    /// The rank PEFT would give `module`.
    public func rank(for module: String) -> Int { Self.firstMatch(rankPattern, module: module) ?? rank }
    /// The alpha PEFT would give `module`.
    public func alpha(for module: String) -> Double { Self.firstMatch(alphaPattern, module: module) ?? alpha }

    /// The LoRA scale of `module`: alpha / r, or alpha / sqrt(r) with `use_rslora`.
    public func scale(for module: String) -> Double {
        let r = Double(rank(for: module))
        return alpha(for: module) / (useRSLoRA ? r.squareRoot() : r)
    }

    /// Whether `target_modules` selects `module`.
    public func targets(_ module: String) -> Bool {
        switch targetModules {
        case .unspecified, .allLinear:
            return true
        case let .names(names):
            return names.contains { module == $0 || module.hasSuffix("." + $0) }
        case let .pattern(pattern):
            guard let regex = try? Regex(pattern) else { return false }
            return (try? regex.wholeMatch(in: module)) != nil
        }
    }
}
