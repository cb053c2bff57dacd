/// The element types a safetensors header may name. Names are case-sensitive, as in the reference implementation.
public enum DType: String, Sendable, CaseIterable {
    /// Boolean, one byte per element.
    case bool = "BOOL"
    /// Unsigned 8-bit integer.
    case u8 = "U8"
    /// Signed 8-bit integer.
    case i8 = "I8"
    /// 8-bit float with 5 exponent bits and 2 mantissa bits.
    case f8e5m2 = "F8_E5M2"
    /// 8-bit float with 4 exponent bits and 3 mantissa bits.
    case f8e4m3 = "F8_E4M3"
    /// 8-bit exponent-only float (8 exponent bits, no mantissa): a power-of-two scale.
    case f8e8m0 = "F8_E8M0"
    /// Signed 16-bit integer.
    case i16 = "I16"
    /// Unsigned 16-bit integer.
    case u16 = "U16"
    /// IEEE 754 half-precision float.
    case f16 = "F16"
    /// bfloat16: 8 exponent bits and 7 mantissa bits.
    case bf16 = "BF16"
    /// Signed 32-bit integer.
    case i32 = "I32"
    /// Unsigned 32-bit integer.
    case u32 = "U32"
    /// IEEE 754 single-precision float.
    case f32 = "F32"
    /// IEEE 754 double-precision float.
    case f64 = "F64"
    /// Signed 64-bit integer.
    case i64 = "I64"
    /// Unsigned 64-bit integer.
    case u64 = "U64"

    /// Bytes per element.
    public var size: Int {
        switch self {
        case .bool, .u8, .i8, .f8e5m2, .f8e4m3, .f8e8m0: return 1
        case .i16, .u16, .f16, .bf16: return 2
        case .i32, .u32, .f32: return 4
        case .f64, .i64, .u64: return 8
        }
    }

    /// True for the dtypes Phatgoose computes with: F32, F16 and BF16.
    public var isComputeFloat: Bool { self == .f32 || self == .f16 || self == .bf16 }

    /// The kernels' code for a compute float dtype (`PG_DTYPE_*`), or nil.
    public var kernelCode: Int32? {
        switch self {
        case .f32: return 0
        case .f16: return 1
        case .bf16: return 2
        default: return nil
        }
    }

    /// Parses a dtype name given on a command line or in a config, case-insensitively (`bf16`, `F32`).
    public init?(userSpelling: String) {
        guard let match = DType.allCases.first(where: { $0.rawValue.lowercased() == userSpelling.lowercased() }) else {
            return nil
        }
        self = match
    }
}
