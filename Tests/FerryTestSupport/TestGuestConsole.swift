/// The test guest's console lines, parsed (formats in Guests/test-guest/README.md).
public struct Heartbeat: Equatable, Sendable {
    public var cpu: Int
    public var seq: Int
    public var ticks: Int
    public var sum: String
    public var written: Int

    /// Parses `HEARTBEAT cpu=C seq=N ticks=T sum=H written=W`.
    public init?(_ line: String) {
        guard line.hasPrefix("HEARTBEAT ") else { return nil }
        let fields = keyValues(line)
        guard let cpu = fields["cpu"].flatMap(Int.init), let seq = fields["seq"].flatMap(Int.init),
              let ticks = fields["ticks"].flatMap(Int.init), let sum = fields["sum"],
              let written = fields["written"].flatMap(Int.init)
        else { return nil }
        (self.cpu, self.seq, self.ticks, self.sum, self.written) = (cpu, seq, ticks, sum, written)
    }
}

/// Parses `VERIFY OK cpu=C pass=K pages=P`.
public struct VerifyOK: Equatable, Sendable {
    public var cpu: Int
    public var pass: Int

    public init?(_ line: String) {
        guard line.hasPrefix("VERIFY OK ") else { return nil }
        let fields = keyValues(line)
        guard let cpu = fields["cpu"].flatMap(Int.init), let pass = fields["pass"].flatMap(Int.init) else { return nil }
        (self.cpu, self.pass) = (cpu, pass)
    }
}

/// `key=value` fields of a console line.
public func keyValues(_ line: String) -> [String: String] {
    var fields: [String: String] = [:]
    for word in line.split(separator: " ") {
        let parts = word.split(separator: "=", maxSplits: 1)
        if parts.count == 2 { fields[String(parts[0])] = String(parts[1]) }
    }
    return fields
}

extension Array where Element == String {
    public var heartbeats: [Heartbeat] { compactMap(Heartbeat.init) }
    public func verifyOK(cpu: Int) -> [String] { filter { $0.hasPrefix("VERIFY OK cpu=\(cpu) ") } }
    public var verifyFailures: [String] { filter { $0.hasPrefix("VERIFY FAIL") } }
    /// The pass numbers of `BLOCK OK` lines: the guest's disk and the memory its disk wrote verified.
    public var blockPasses: [Int] { filter { $0.hasPrefix("BLOCK OK ") }.compactMap { keyValues($0)["pass"].flatMap { Int($0) } } }
    /// What the guest's device workloads found wrong: bad or stalled blocks, bad entropy, a device
    /// that needs a reset.
    public var deviceFailures: [String] {
        filter { $0.hasPrefix("BLOCK BAD") || $0.hasPrefix("BLOCK STALL") || $0.hasPrefix("RNG BAD") || $0.contains("NEEDS_RESET") }
    }
}
