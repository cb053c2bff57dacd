import PhatgooseFormats
import PhatgooseLibrary

/// Any bytes as library.json: parse and validate; an accepted manifest must serialise and read back the same.
func fuzzManifest(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard let document = try? JSONParser.parse(UnsafeRawBufferPointer(start: data, count: size)),
          let manifest = try? LibraryManifest(document: document, file: "library.json")
    else { return 0 }
    let again = try! LibraryManifest(document: manifest.document(), file: "library.json")
    precondition(again.experts == manifest.experts && again.routing == manifest.routing, "manifest does not round-trip")
    return 0
}
