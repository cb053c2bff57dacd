/// The globals a tensor state dict needs, and nothing else. A pickle names code through globals; reading a checkpoint
/// accepts exactly these and refuses every other name before anything could be called, so no checkpoint ever runs
/// code here. What each does is re-implemented below as plain data: no lookup by name ever reaches real code.
enum TorchGlobal: Equatable {
    /// `collections.OrderedDict`: called with no arguments (or a list of pairs) it makes a dict.
    case orderedDict
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    case rebuildTensorV2
    /// `torch._utils._rebuild_parameter(tensor, requires_grad, hooks)`: a parameter is its tensor here.
    case rebuildParameter
    /// `torch.<Type>Storage`: valid only inside a persistent id, where it names the storage's element type.
    case storageType(DType)

    /// The storage types and the element type each stands for.
    static let storageTypes: [String: DType] = [
        "FloatStorage": .f32, "HalfStorage": .f16, "BFloat16Storage": .bf16, "DoubleStorage": .f64,
        "LongStorage": .i64, "IntStorage": .i32, "ShortStorage": .i16, "CharStorage": .i8, "ByteStorage": .u8,
        "BoolStorage": .bool,
    ]

    /// The allowed global `module.name`, or nil.
    init?(module: String, name: String) {
        switch (module, name) {
        case ("collections", "OrderedDict"): self = .orderedDict
        case ("torch._utils", "_rebuild_tensor_v2"): self = .rebuildTensorV2
        case ("torch._utils", "_rebuild_parameter"): self = .rebuildParameter
        case ("torch", _):
            guard let dtype = Self.storageTypes[name] else { return nil }
            self = .storageType(dtype)
        default: return nil
        }
    }

    static let allowedDescription = "collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter and the torch storage types (FloatStorage, BFloat16Storage, HalfStorage, ...)"
}

/// A storage of a checkpoint: the zip entry `<prefix>/data/<key>` holding `count` elements of `dtype`.
public struct TorchStorage: Sendable, Equatable {
    /// The storage's key: its entry is `<prefix>/data/<key>`.
    public let key: String
    /// The element type.
    public let dtype: DType
    /// Number of elements.
    public let count: Int
}

/// A tensor of a checkpoint: a strided view into a storage, as `_rebuild_tensor_v2` describes it.
public struct TorchTensor: Sendable, Equatable {
    /// The storage the tensor views.
    public let storage: TorchStorage
    /// Offset of element [0, ..., 0] in the storage, in elements.
    public let storageOffset: Int
    /// Dimensions, outermost first.
    public let shape: [Int]
    /// Strides in elements, one per dimension.
    public let strides: [Int]

    /// The element type.
    public var dtype: DType { storage.dtype }
    /// Number of elements.
    public var elementCount: Int { shape.reduce(1, *) }
    /// The shape as text, `[2, 3]`.
    public var shapeDescription: String { "[" + shape.map(String.init).joined(separator: ", ") + "]" }
}

/// A value on the restricted unpickler's stack. Lists and dicts are boxes because the memo shares them.
indirect enum PickleValue {
    case none
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case bytes([UInt8])
    case tuple(PickleTuple)
    case list(PickleList)
    case dict(PickleDict)
    case global(TorchGlobal)
    case storage(TorchStorage)
    case tensor(TorchTensor)

    var kindDescription: String {
        switch self {
        case .none: return "None"
        case .bool: return "a bool"
        case .int: return "an int"
        case .float: return "a float"
        case .string: return "a string"
        case .bytes: return "bytes"
        case .tuple: return "a tuple"
        case .list: return "a list"
        case .dict: return "a dict"
        case .global: return "a global"
        case .storage: return "a storage"
        case .tensor: return "a tensor"
        }
    }
}

// Composite values are boxes: the memo shares lists and dicts, and every box has an identity, so that a finished
// value graph can be taken apart iteratively (``TorchPickleReader/dismantle(_:)``) instead of by recursive releases,
// which a deeply nested pickle would turn into a stack overflow.
final class PickleTuple {
    var items: [PickleValue]
    init(_ items: [PickleValue]) { self.items = items }
}
final class PickleList { var items: [PickleValue] = [] }
final class PickleDict { var items: [(key: PickleValue, value: PickleValue)] = [] }

/// A pickle virtual machine that knows the opcodes of protocols 0-5 that carry data, and the few globals of
/// ``TorchGlobal``. Opcodes that build arbitrary objects (INST, OBJ, NEWOBJ, NEWOBJ_EX), out-of-band buffers and
/// extension registries are refused; so is every other global, at the opcode that names it.
struct TorchPickleReader {
    private let bytes: UnsafeRawBufferPointer
    private let file: String
    private let entry: String
    private var position = 0
    private var stack: [PickleValue] = []
    private var marks: [Int] = []
    private var memo: [Int: PickleValue] = [:]
    private let maxStorageElements: Int
    /// Container items left to build. A pickle names each item with at least one opcode byte, except that
    /// `OrderedDict(list)` and memo references can copy many at once: the budget, proportional to the pickle's size,
    /// keeps a small pickle from building an enormous graph (or taking minutes doing it).
    private var budget: Int

    /// `entry` names the pickle inside `file` in messages; storages may hold at most `maxStorageElements` elements.
    init(bytes: UnsafeRawBufferPointer, file: String, entry: String, maxStorageElements: Int = Int.max) {
        self.bytes = bytes
        self.file = file
        self.entry = entry
        self.maxStorageElements = maxStorageElements
        budget = 4 * bytes.count + 4096
    }

    private mutating func spend(_ items: Int, at offset: Int) throws(FormatError) {
        budget -= items
        guard budget >= 0 else {
            throw failure("expected a pickle that builds at most \(4 * bytes.count + 4096) container items (4 per byte), found it building more (refusing to amplify a small file into a huge value)", at: offset)
        }
    }

    /// Takes apart a value graph without recursion: every box reachable from `roots` is emptied once, so releasing
    /// them afterwards costs no stack however deep the nesting was (cycles through the memo are broken too).
    static func dismantle(_ roots: [PickleValue]) {
        var work = roots
        var seen = Set<ObjectIdentifier>()
        while let value = work.popLast() {
            switch value {
            case let .tuple(box):
                guard seen.insert(ObjectIdentifier(box)).inserted else { continue }
                work.append(contentsOf: box.items)
                box.items = []
            case let .list(box):
                guard seen.insert(ObjectIdentifier(box)).inserted else { continue }
                work.append(contentsOf: box.items)
                box.items = []
            case let .dict(box):
                guard seen.insert(ObjectIdentifier(box)).inserted else { continue }
                for (key, item) in box.items { work.append(key); work.append(item) }
                box.items = []
            default: continue
            }
        }
    }

    /// Takes apart everything the machine still holds, and `also` (the value ``read()`` returned, once used).
    mutating func dismantle(also values: [PickleValue] = []) {
        let held = stack + Array(memo.values) + values
        stack = []
        memo = [:]
        Self.dismantle(held)
    }

    private func failure(_ message: String, at offset: Int? = nil) -> FormatError {
        FormatError(.pickle, file: file, subject: "\(entry) byte \(offset ?? position)", message)
    }

    private mutating func take(_ n: Int) throws(FormatError) -> UnsafeRawBufferPointer {
        guard n >= 0, n <= bytes.count - position else {
            throw failure("expected \(n) more bytes, found the pickle ending after \(bytes.count - position) (truncated)")
        }
        let slice = UnsafeRawBufferPointer(rebasing: bytes[position..<(position + n)])
        position += n
        return slice
    }

    private mutating func uint(_ n: Int) throws(FormatError) -> UInt64 {
        let raw = try take(n)
        var value: UInt64 = 0
        for i in (0..<n).reversed() { value = value << 8 | UInt64(raw[i]) }
        return value
    }

    private mutating func length(_ n: Int) throws(FormatError) -> Int {
        let value = try uint(n)
        guard value <= UInt64(bytes.count - position) else {
            throw failure("expected a length within the pickle's \(bytes.count - position) remaining bytes, found \(value) (truncated or damaged)")
        }
        return Int(value)
    }

    private mutating func line() throws(FormatError) -> String {
        let start = position
        while position < bytes.count && bytes[position] != 0x0A { position += 1 }
        guard position < bytes.count else { throw failure("expected a newline-terminated line, found the end of the pickle", at: start) }
        let text = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
        position += 1
        return text
    }

    private mutating func text(_ n: Int) throws(FormatError) -> String {
        let start = position
        guard let value = String(validating: try take(n), as: UTF8.self) else { throw failure("expected a UTF-8 string, found invalid bytes", at: start) }
        return value
    }

    private mutating func pop() throws(FormatError) -> PickleValue {
        guard let value = stack.popLast(), stack.count >= (marks.last ?? 0) else { throw failure("expected a value on the stack, found it empty") }
        return value
    }

    private mutating func popToMark() throws(FormatError) -> [PickleValue] {
        guard let mark = marks.popLast() else { throw failure("expected a MARK before this opcode, found none") }
        let items = Array(stack[mark...])
        stack.removeSubrange(mark...)
        return items
    }

    private mutating func global(module: String, name: String, at offset: Int) throws(FormatError) -> PickleValue {
        guard let known = TorchGlobal(module: module, name: name) else {
            throw failure("refused global \(module).\(name): a checkpoint may name only \(TorchGlobal.allowedDescription); reading a checkpoint never runs its code", at: offset)
        }
        return .global(known)
    }

    /// Runs the pickle to its STOP opcode and returns the value it built. Once done with the value, call
    /// ``dismantle(also:)`` with it; on an error the machine dismantles what it built itself.
    mutating func read() throws(FormatError) -> PickleValue {
        do {
            return try run()
        } catch {
            dismantle()
            throw error
        }
    }

    private mutating func run() throws(FormatError) -> PickleValue {
        while true {
            let offset = position
            let opcode = try take(1)[0]
            switch opcode {
            case 0x80: _ = try take(1)                          // PROTO
            case 0x95: _ = try take(8)                          // FRAME: framing only
            case 0x2E:                                          // STOP
                guard stack.count == 1, marks.isEmpty else { throw failure("expected one value on the stack at STOP, found \(stack.count)", at: offset) }
                return stack[0]
            case 0x28: marks.append(stack.count)                // MARK
            case 0x30: _ = try pop()                            // POP
            case 0x31: _ = try popToMark()                      // POP_MARK
            case 0x32:                                          // DUP
                guard let top = stack.last else { throw failure("expected a value to duplicate, found an empty stack", at: offset) }
                stack.append(top)
            case 0x4E: stack.append(.none)                      // NONE
            case 0x88: stack.append(.bool(true))                // NEWTRUE
            case 0x89: stack.append(.bool(false))               // NEWFALSE
            case 0x4A: stack.append(.int(Int(Int32(truncatingIfNeeded: try uint(4)))))  // BININT
            case 0x4B: stack.append(.int(Int(try uint(1))))     // BININT1
            case 0x4D: stack.append(.int(Int(try uint(2))))     // BININT2
            case 0x8A, 0x8B:                                    // LONG1, LONG4
                let n = try length(opcode == 0x8A ? 1 : 4)
                guard n <= 8 else { throw failure("expected an integer of at most 8 bytes, found \(n)", at: offset) }
                if n == 0 { stack.append(.int(0)); break }
                let raw = try uint(n)
                let shift = UInt64(64 - 8 * n)
                stack.append(.int(Int(Int64(bitPattern: raw << shift) >> Int64(shift))))
            case 0x49:                                          // INT (text): also True/False as 01/00
                let value = try line()
                if value == "01" { stack.append(.bool(true)) } else if value == "00" { stack.append(.bool(false)) } else {
                    guard let number = Int(value) else { throw failure("expected a decimal integer, found '\(value)'", at: offset) }
                    stack.append(.int(number))
                }
            case 0x47:                                          // BINFLOAT: big-endian double
                let raw = try take(8)
                var bits: UInt64 = 0
                for i in 0..<8 { bits = bits << 8 | UInt64(raw[i]) }
                stack.append(.float(Double(bitPattern: bits)))
            case 0x58: stack.append(.string(try text(try length(4))))   // BINUNICODE
            case 0x8C: stack.append(.string(try text(try length(1))))   // SHORT_BINUNICODE
            case 0x8D: stack.append(.string(try text(try length(8))))   // BINUNICODE8
            case 0x54, 0x55:                                            // BINSTRING, SHORT_BINSTRING (Python 2 str)
                stack.append(.string(String(decoding: try take(try length(opcode == 0x54 ? 4 : 1)), as: UTF8.self)))
            case 0x42: stack.append(.bytes(Array(try take(try length(4)))))  // BINBYTES
            case 0x43: stack.append(.bytes(Array(try take(try length(1)))))  // SHORT_BINBYTES
            case 0x8E: stack.append(.bytes(Array(try take(try length(8)))))  // BINBYTES8
            case 0x29: stack.append(.tuple(PickleTuple([])))    // EMPTY_TUPLE
            case 0x74:                                          // TUPLE
                let items = try popToMark()
                try spend(items.count, at: offset)
                stack.append(.tuple(PickleTuple(items)))
            case 0x85: let a = try pop(); try spend(1, at: offset); stack.append(.tuple(PickleTuple([a])))  // TUPLE1
            case 0x86: let b = try pop(), a = try pop(); try spend(2, at: offset); stack.append(.tuple(PickleTuple([a, b])))  // TUPLE2
            case 0x87:                                          // TUPLE3
                let c = try pop(), b = try pop(), a = try pop()
                try spend(3, at: offset)
                stack.append(.tuple(PickleTuple([a, b, c])))
            case 0x5D: stack.append(.list(PickleList()))        // EMPTY_LIST
            case 0x6C:                                          // LIST
                let list = PickleList()
                list.items = try popToMark()
                try spend(list.items.count, at: offset)
                stack.append(.list(list))
            case 0x7D: stack.append(.dict(PickleDict()))        // EMPTY_DICT
            case 0x64:                                          // DICT
                let items = try popToMark()
                try spend(items.count, at: offset)
                stack.append(.dict(try makeDict(pairs: items, at: offset)))
            case 0x61:                                          // APPEND
                let value = try pop()
                try spend(1, at: offset)
                try list(at: offset).items.append(value)
            case 0x65:                                          // APPENDS
                let values = try popToMark()
                try spend(values.count, at: offset)
                try list(at: offset).items.append(contentsOf: values)
            case 0x73:                                          // SETITEM
                let value = try pop(), key = try pop()
                try spend(2, at: offset)
                try dict(at: offset).items.append((key, value))
            case 0x75:                                          // SETITEMS
                let items = try popToMark()
                try spend(items.count, at: offset)
                let target = try dict(at: offset)
                let pairs = try makeDict(pairs: items, at: offset)
                target.items.append(contentsOf: pairs.items)
            case 0x71: memo[Int(try uint(1))] = try top(at: offset)    // BINPUT
            case 0x72: memo[Int(try uint(4))] = try top(at: offset)    // LONG_BINPUT
            case 0x94: memo[memo.count] = try top(at: offset)          // MEMOIZE
            case 0x70:                                                 // PUT (text)
                let key = try line()
                guard let n = Int(key) else { throw failure("expected a memo index, found '\(key)'", at: offset) }
                memo[n] = try top(at: offset)
            case 0x68, 0x6A, 0x67:                                     // BINGET, LONG_BINGET, GET
                let key: Int
                if opcode == 0x67 {
                    let text = try line()
                    guard let n = Int(text) else { throw failure("expected a memo index, found '\(text)'", at: offset) }
                    key = n
                } else {
                    key = Int(try uint(opcode == 0x68 ? 1 : 4))
                }
                guard let value = memo[key] else { throw failure("expected memo entry \(key) to exist, found none", at: offset) }
                stack.append(value)
            case 0x63:                                                 // GLOBAL
                let module = try line(), name = try line()
                stack.append(try global(module: module, name: name, at: offset))
            case 0x93:                                                 // STACK_GLOBAL
                let name = try pop(), module = try pop()
                guard case let .string(m) = module, case let .string(n) = name else {
                    throw failure("expected two strings for STACK_GLOBAL, found \(module.kindDescription) and \(name.kindDescription)", at: offset)
                }
                stack.append(try global(module: m, name: n, at: offset))
            case 0x51:                                                 // BINPERSID
                stack.append(try persistentLoad(try pop(), at: offset))
            case 0x52:                                                 // REDUCE
                let arguments = try pop(), callable = try pop()
                guard case let .global(function) = callable, case let .tuple(args) = arguments else {
                    throw failure("expected REDUCE of an allowed global with a tuple, found \(callable.kindDescription) with \(arguments.kindDescription)", at: offset)
                }
                stack.append(try reduce(function, args.items, at: offset))
            case 0x62:                                                 // BUILD
                let state = try pop()
                guard case .dict = try top(at: offset) else {
                    throw failure("expected BUILD to set the state of an OrderedDict, found it applied to \(try top(at: offset).kindDescription)", at: offset)
                }
                // An OrderedDict's state is its attributes, such as a state dict's `_metadata` (module versions):
                // nothing a tensor depends on.
                switch state {
                case .dict, .none, .tuple: break
                default: throw failure("expected an attribute dict as an OrderedDict's state, found \(state.kindDescription)", at: offset)
                }
            default:
                throw failure("refused pickle opcode 0x\(String(opcode, radix: 16)) ('\(Character(Unicode.Scalar(opcode)))'): a tensor state dict needs only data opcodes, OrderedDict and tensor rebuilds", at: offset)
            }
        }
    }

    private func top(at offset: Int) throws(FormatError) -> PickleValue {
        guard let value = stack.last, stack.count > (marks.last ?? 0) || marks.isEmpty else {
            throw failure("expected a value on the stack, found it empty", at: offset)
        }
        return value
    }

    private mutating func list(at offset: Int) throws(FormatError) -> PickleList {
        guard case let .list(list) = try top(at: offset) else { throw failure("expected a list to append to, found \(try top(at: offset).kindDescription)", at: offset) }
        return list
    }

    private mutating func dict(at offset: Int) throws(FormatError) -> PickleDict {
        guard case let .dict(dict) = try top(at: offset) else { throw failure("expected a dict to set items in, found \(try top(at: offset).kindDescription)", at: offset) }
        return dict
    }

    private func makeDict(pairs items: [PickleValue], at offset: Int) throws(FormatError) -> PickleDict {
        guard items.count % 2 == 0 else { throw failure("expected key-value pairs, found an odd number (\(items.count)) of items", at: offset) }
        let dict = PickleDict()
        dict.items.reserveCapacity(items.count / 2)
        for i in stride(from: 0, to: items.count, by: 2) { dict.items.append((items[i], items[i + 1])) }
        return dict
    }

    /// `('storage', <Type>Storage, key, location, count)`, as torch.save writes storages.
    private func persistentLoad(_ id: PickleValue, at offset: Int) throws(FormatError) -> PickleValue {
        guard case let .tuple(box) = id, box.items.count == 5, case .string("storage") = box.items[0] else {
            throw failure("expected a persistent id ('storage', type, key, location, count), found \(id.kindDescription)", at: offset)
        }
        let fields = box.items
        guard case let .global(.storageType(dtype)) = fields[1] else {
            throw failure("expected a torch storage type in the persistent id, found \(fields[1].kindDescription)", at: offset)
        }
        guard case let .string(key) = fields[2], !key.isEmpty, !key.contains("/") else {
            throw failure("expected a storage key without '/' in the persistent id, found \(fields[2].kindDescription)", at: offset)
        }
        guard case .string = fields[3] else { throw failure("expected a location string in the persistent id, found \(fields[3].kindDescription)", at: offset) }
        guard case let .int(count) = fields[4], count >= 0 else {
            throw failure("expected a non-negative element count in the persistent id, found \(fields[4].kindDescription)", at: offset)
        }
        // A storage is an entry of the archive, so it holds fewer elements than the archive has bytes.
        guard count <= maxStorageElements else {
            throw failure("expected a storage of at most \(maxStorageElements) elements (the archive's size), found \(count)", at: offset)
        }
        return .storage(TorchStorage(key: key, dtype: dtype, count: count))
    }

    private func integers(_ value: PickleValue, _ what: String, at offset: Int) throws(FormatError) -> [Int] {
        guard case let .tuple(box) = value else { throw failure("expected a tuple of integers as the tensor's \(what), found \(value.kindDescription)", at: offset) }
        var result: [Int] = []
        for item in box.items {
            guard case let .int(n) = item, n >= 0 else { throw failure("expected non-negative integers in the tensor's \(what), found \(item.kindDescription)", at: offset) }
            result.append(n)
        }
        return result
    }

    private func isEmptyHooks(_ value: PickleValue) -> Bool {
        switch value {
        case .none: return true
        case let .dict(dict): return dict.items.isEmpty
        default: return false
        }
    }

    private mutating func reduce(_ function: TorchGlobal, _ args: [PickleValue], at offset: Int) throws(FormatError) -> PickleValue {
        switch function {
        case .orderedDict:
            if args.isEmpty { return .dict(PickleDict()) }
            guard args.count == 1, case let .list(pairs) = args[0] else {
                throw failure("expected OrderedDict() or OrderedDict(list of pairs), found \(args.count) arguments", at: offset)
            }
            try spend(2 * pairs.items.count, at: offset)
            let dict = PickleDict()
            for pair in pairs.items {
                let items: [PickleValue]
                switch pair {
                case let .tuple(t): items = t.items
                case let .list(l): items = l.items
                default: items = []
                }
                guard items.count == 2 else { throw failure("expected (key, value) pairs for OrderedDict, found \(pair.kindDescription)", at: offset) }
                dict.items.append((items[0], items[1]))
            }
            return .dict(dict)
        case .rebuildTensorV2:
            guard args.count == 6 || args.count == 7, case let .storage(storage) = args[0], case let .int(storageOffset) = args[1], storageOffset >= 0 else {
                throw failure("expected _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]), found other arguments", at: offset)
            }
            let shape = try integers(args[2], "size", at: offset)
            let strides = try integers(args[3], "stride", at: offset)
            guard shape.count == strides.count else {
                throw failure("expected one stride per dimension, found size \(shape) and stride \(strides)", at: offset)
            }
            guard case .bool = args[4], isEmptyHooks(args[5]) else {
                throw failure("expected requires_grad and no backward hooks in _rebuild_tensor_v2, found \(args[4].kindDescription) and \(args[5].kindDescription)", at: offset)
            }
            // The highest element the view touches must lie inside the storage.
            var (count, extent) = (1, 0)
            for (size, stride) in zip(shape, strides) {
                let (c, o1) = count.multipliedReportingOverflow(by: size)
                let (span, o2) = (max(size, 1) - 1).multipliedReportingOverflow(by: stride)
                let (e, o3) = extent.addingReportingOverflow(span)
                guard !o1, !o2, !o3 else { throw failure("expected a tensor of a representable size, found size \(shape) and stride \(strides)", at: offset) }
                (count, extent) = (c, e)
            }
            // The highest element is storageOffset + extent; written so that nothing can overflow.
            if count > 0 && (storageOffset >= storage.count || extent >= storage.count - storageOffset) || storageOffset > storage.count {
                throw failure("expected the view (offset \(storageOffset), size \(shape), stride \(strides)) to lie inside storage '\(storage.key)' of \(storage.count) elements, found it reaching past it", at: offset)
            }
            return .tensor(TorchTensor(storage: storage, storageOffset: storageOffset, shape: shape, strides: strides))
        case .rebuildParameter:
            guard args.count == 3, case .tensor = args[0], isEmptyHooks(args[2]) else {
                throw failure("expected _rebuild_parameter(tensor, requires_grad, no hooks), found other arguments", at: offset)
            }
            return args[0]
        case .storageType:
            throw failure("expected a storage type only inside a persistent id, found it called", at: offset)
        }
    }
}
