import FerryTestSupport
import Foundation
import Testing

/// `--seccomp` on a running `ferry`: every thread carries the VMM's filter, and vCPU and device
/// threads one more of their own (their narrower lists, docs/security.md); `false` installs none.
/// The rest of the suite runs every `ferry` with the default, `true`: a system call missing from a
/// list would end that VMM with a message naming it, and its test would fail.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM))
struct SeccompProcessTests {
    /// Each thread's name and `Seccomp_filters` count, from /proc.
    static func filters(of pid: Int32) throws -> [(thread: String, filters: Int)] {
        try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task").compactMap { task in
            guard let name = try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/comm", encoding: .utf8),
                  let status = try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/status", encoding: .utf8),
                  let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Seccomp_filters:") }),
                  let count = Int(line.split(separator: "\t").last ?? "") else { return nil }
            return (name.trimmingCharacters(in: .newlines), count)
        }
    }

    @Test(arguments: ["true", "log", "false"])
    func threadsCarryTheirKindsFilters(setting: String) throws {
        let ferry = try FerryProcess(arguments: ["--kernel", try TestGuest.path.get(), "--cpus", "boot=2", "--memory", "size=128M",
                                                 "--rng", "src=/dev/urandom", "--serial", "tty", "--seccomp", setting,
                                                 "--cmdline", "workset_mib=1 heartbeat_ms=100"])
        defer { ferry.signal(SIGKILL) }
        #expect(ferry.waitForConsoleLine(timeout: .seconds(60)) { $0.hasPrefix("HEARTBEAT cpu=1 ") } != nil, "\(ferry.standardError)")
        let threads = try Self.filters(of: ferry.pid)
        let expected = { (name: String) -> Int in
            guard setting != "false" else { return 0 }
            return name.hasPrefix("vcpu") || name.hasPrefix("virtio-") ? 2 : 1
        }
        #expect(threads.filter { $0.thread.hasPrefix("vcpu") }.count == 2, "\(threads)")
        #expect(threads.contains { $0.thread.hasPrefix("virtio-rng") }, "\(threads)")
        // KVM's own worker (kvm-nx-lpage-recovery) is listed among the process's threads and
        // takes the filters of the vCPU that started it; it runs kernel code only.
        for (thread, count) in threads where !thread.hasPrefix("kvm-") {
            #expect(count == expected(thread), "\(thread): \(count) filters with --seccomp \(setting)")
        }
        #expect(!ferry.standardError.contains("forbidden system call"), "\(ferry.standardError)")
    }

    /// A stopped and continued process (SIGSTOP and SIGCONT, as a debugger, Ctrl-Z or the cgroup
    /// freezer do) resumes its interrupted timed waits through restart_syscall, which every list
    /// allows: the VMM and its guest go on.
    @Test func aStoppedAndContinuedVMMGoesOn() async throws {
        let directory = try TemporaryDirectory()
        let vmm = try await TestVMM("vmm", in: directory)
        try await vmm.boot(TestGuestVM(cpus: 2, memoryMiB: 64, workload: "workset_mib=1 dirty_rate=10"))
        for _ in 0..<3 {
            vmm.process.signal(SIGSTOP)
            try await Task.sleep(for: .milliseconds(300))
            vmm.process.signal(SIGCONT)
            try await Task.sleep(for: .milliseconds(100))
        }
        let mark = vmm.process.consoleLines.count
        for cpu in 0..<2 {
            _ = try await vmm.waitForConsoleLine(after: mark, timeout: .seconds(30)) { $0.hasPrefix("HEARTBEAT cpu=\(cpu) ") }
        }
        #expect(try await vmm.info().state == "Running")
        #expect(!vmm.process.standardError.contains("forbidden system call"), "\(vmm.process.standardError)")
        #expect(await vmm.shutDown())
    }
}
