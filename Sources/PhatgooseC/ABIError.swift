// The C ABI (include/phatgoose.h) in Swift. Each entry point is a `@c @implementation` of the declaration the
// header makes, so the compiler checks its signature against the header; they are `public` only so that release
// builds export them. Each body runs in `abiCall`, which turns any error into a status and the thread's last error
// message: nothing thrown, and nothing the runtime would trap on, crosses into C.
import CPhatgoose
import PhatgooseDistributed
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseRouting
import PhatgooseRuntime

/// A failure of a C ABI call: the status it returns and the message `phatgoose_last_error_message` then gives.
struct ABIError: Error, Sendable, CustomStringConvertible {
    let status: phatgoose_status
    let message: String

    init(_ status: phatgoose_status, _ message: String) {
        self.status = status
        self.message = message
    }

    var description: String { message }

    /// The status and message of any error the Swift API throws. Every error of the package's modules has its
    /// status; anything else is `INTERNAL`, never a trap.
    init(translating error: any Error) {
        switch error {
        case let error as ABIError:
            self = error
        case let error as RuntimeError:
            let status: phatgoose_status
            switch error.code {
            case .option: status = PHATGOOSE_STATUS_INVALID_ARGUMENT
            case .overloaded: status = PHATGOOSE_STATUS_OVERLOADED
            case .memoryCap: status = PHATGOOSE_STATUS_MEMORY_CAP
            case .notFound: status = PHATGOOSE_STATUS_NOT_FOUND
            case .shape: status = PHATGOOSE_STATUS_SHAPE
            case .shutDown: status = PHATGOOSE_STATUS_SHUT_DOWN
            case .library: status = PHATGOOSE_STATUS_LIBRARY
            case .nonFiniteInput: status = PHATGOOSE_STATUS_NON_FINITE_INPUT
            default: status = PHATGOOSE_STATUS_INTERNAL
            }
            self.init(status, error.description)
        case let error as DistributedError:
            let status: phatgoose_status
            switch error.code {
            case .unavailable: status = PHATGOOSE_STATUS_UNAVAILABLE
            case .timeout: status = PHATGOOSE_STATUS_TIMEOUT
            case .option: status = PHATGOOSE_STATUS_INVALID_ARGUMENT
            case .memoryCap: status = PHATGOOSE_STATUS_MEMORY_CAP
            case .shape: status = PHATGOOSE_STATUS_SHAPE
            case .stopped: status = PHATGOOSE_STATUS_SHUT_DOWN
            default: status = PHATGOOSE_STATUS_INTERNAL
            }
            self.init(status, error.message)
        case let error as RoutingError:
            self.init(PHATGOOSE_STATUS_INVALID_ARGUMENT, error.description)
        case let error as LibraryError:
            self.init(PHATGOOSE_STATUS_LIBRARY, error.description)
        case let error as FormatError:
            self.init(error.code == .io ? PHATGOOSE_STATUS_IO : PHATGOOSE_STATUS_LIBRARY, error.description)
        default:
            self.init(PHATGOOSE_STATUS_INTERNAL, String(describing: error))
        }
    }
}

/// Runs the body of a C entry point: its status, with any error's message stored as the thread's last error.
@inline(__always)
func abiCall(_ body: () throws -> Void) -> phatgoose_status {
    do {
        try body()
        return PHATGOOSE_STATUS_OK
    } catch {
        let failure = ABIError(translating: error)
        pg_abi_set_last_error(failure.message)
        return failure.status
    }
}

/// A required output pointer, or `INVALID_ARGUMENT` naming it.
func required<T>(_ pointer: UnsafeMutablePointer<T>?, _ name: String) throws(ABIError) -> UnsafeMutablePointer<T> {
    guard let pointer else { throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(name): expected a pointer, found NULL") }
    return pointer
}

/// A C string argument as a Swift string: required, and UTF-8.
func string(_ pointer: UnsafePointer<CChar>?, _ name: String) throws(ABIError) -> String {
    guard let pointer else { throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(name): expected a string, found NULL") }
    guard let value = String(validatingCString: pointer) else {
        throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(name): expected UTF-8, found invalid bytes")
    }
    return value
}

/// A C string argument naming a file or directory: a string (as ``string(_:_:)``) that is not empty, since an
/// empty path names nothing and would otherwise surface as a puzzling file error. `what` says what it should name.
func filePath(_ pointer: UnsafePointer<CChar>?, _ name: String, naming what: String) throws(ABIError) -> String {
    let value = try string(pointer, name)
    guard !value.isEmpty else {
        throw ABIError(PHATGOOSE_STATUS_INVALID_ARGUMENT, "\(name): expected the path of \(what), found an empty string")
    }
    return value
}

/// A `size_t` argument, which arrives as an `Int`: values above `Int.max` show up negative.
func count(_ value: Int, _ name: String) throws(ABIError) -> Int {
    guard value >= 0 else {
        throw ABIError(PHATGOOSE_STATUS_SHAPE, "\(name): expected at most \(Int.max), found \(UInt(bitPattern: value))")
    }
    return value
}
