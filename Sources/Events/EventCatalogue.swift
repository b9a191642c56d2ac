/// Every event Ferry emits, as docs/events.md lists them; a test keeps the two equal.
public enum EventCatalogue {
    public static let all: [any EventPayload.Type] = [
        VMMEvent.Starting.self, VMMEvent.Shutdown.self, VMMEvent.EventsDropped.self,
        VMEvent.Booting.self, VMEvent.Booted.self, VMEvent.Pausing.self, VMEvent.Paused.self,
        VMEvent.Resuming.self, VMEvent.Resumed.self, VMEvent.Rebooting.self, VMEvent.Rebooted.self,
        VMEvent.Shutdown.self, VMEvent.Deleted.self,
        VMEvent.Snapshotting.self, VMEvent.Snapshotted.self, VMEvent.SnapshotFailed.self,
        VMEvent.Restoring.self, VMEvent.Restored.self, VMEvent.RestoreFailed.self,
        VMEvent.MigrationStarted.self, VMEvent.MigrationMemoryIteration.self, VMEvent.MigrationDowntime.self,
        VMEvent.MigrationFinished.self, VMEvent.MigrationFailed.self, VMEvent.MigrationCancelled.self,
        VMEvent.MigrationReceiveReady.self, VMEvent.MigrationReceiveStarted.self,
        VMEvent.MigrationReceiveFinished.self, VMEvent.MigrationReceiveFailed.self,
    ]

    /// The kind of event named `qualifiedName` (`vm.migration-started`), if Ferry has one.
    public static func payloadType(named qualifiedName: String) -> (any EventPayload.Type)? {
        all.first { $0.qualifiedName == qualifiedName }
    }
}

/// Events about the VMM process itself (docs/events.md §4.1).
public enum VMMEvent {
    /// The first event of every stream.
    public struct Starting: EventPayload {
        public static let source = EventSource.vmm
        public static let name = "starting"
        public static let example = Starting(version: "0.1.0", pid: 4242, wallClock: "2026-12-07T05:23:38.250113Z")
        public var version: String
        public var pid: Int32
        /// RFC 3339 UTC time at timestamp 0, with microseconds.
        public var wallClock: String

        public init(version: String, pid: Int32, wallClock: String) {
            self.version = version
            self.pid = pid
            self.wallClock = wallClock
        }
    }

    /// The last event before the VMM process exits normally.
    public struct Shutdown: EventPayload {
        public static let source = EventSource.vmm
        public static let name = "shutdown"
        public static let example = Shutdown()
        public init() {}
    }

    /// The writer's queue overflowed: `count` older events were dropped (docs/events.md §2).
    public struct EventsDropped: EventPayload {
        public static let source = EventSource.vmm
        public static let name = "events-dropped"
        public static let example = EventsDropped(count: 12)
        public var count: Int

        public init(count: Int) {
            self.count = count
        }
    }
}

/// Events about the virtual machine (docs/events.md §4.2 to §4.5).
public enum VMEvent {
    public struct Booting: EventPayload {
        public static let source = EventSource.vm
        public static let name = "booting"
        public static let example = Booting()
        public init() {}
    }

    public struct Booted: EventPayload {
        public static let source = EventSource.vm
        public static let name = "booted"
        public static let example = Booted()
        public init() {}
    }

    public struct Pausing: EventPayload {
        public static let source = EventSource.vm
        public static let name = "pausing"
        public static let example = Pausing()
        public init() {}
    }

    public struct Paused: EventPayload {
        public static let source = EventSource.vm
        public static let name = "paused"
        public static let example = Paused()
        public init() {}
    }

    public struct Resuming: EventPayload {
        public static let source = EventSource.vm
        public static let name = "resuming"
        public static let example = Resuming()
        public init() {}
    }

    public struct Resumed: EventPayload {
        public static let source = EventSource.vm
        public static let name = "resumed"
        public static let example = Resumed()
        public init() {}
    }

    public struct Rebooting: EventPayload {
        public static let source = EventSource.vm
        public static let name = "rebooting"
        public static let example = Rebooting()
        public init() {}
    }

    public struct Rebooted: EventPayload {
        public static let source = EventSource.vm
        public static let name = "rebooted"
        public static let example = Rebooted()
        public init() {}
    }

    /// Who stopped the VM.
    public enum ShutdownReason: String, Codable, Sendable {
        /// The guest powered off or reset, or the VM failed (then `error` says how).
        case guest
        /// The operator: `vm.shutdown`, `vm.delete`, `vmm.shutdown` or a signal.
        case api
    }

    /// The VM stopped.
    public struct Shutdown: EventPayload {
        public static let source = EventSource.vm
        public static let name = "shutdown"
        public static let example = Shutdown(reason: .guest, error: "triple fault (KVM_EXIT_SHUTDOWN) on vCPU 0 at RIP 0x100000")
        public var reason: ShutdownReason
        /// Why the VM failed, when it did not simply power off.
        public var error: String?

        public init(reason: ShutdownReason, error: String? = nil) {
            self.reason = reason
            self.error = error
        }
    }

    public struct Deleted: EventPayload {
        public static let source = EventSource.vm
        public static let name = "deleted"
        public static let example = Deleted()
        public init() {}
    }

    public struct Snapshotting: EventPayload {
        public static let source = EventSource.vm
        public static let name = "snapshotting"
        public static let example = Snapshotting()
        public init() {}
    }

    public struct Snapshotted: EventPayload {
        public static let source = EventSource.vm
        public static let name = "snapshotted"
        public static let example = Snapshotted(destination: "/var/lib/ferry/vm1.snapshot")
        /// The snapshot's directory.
        public var destination: String

        public init(destination: String) {
            self.destination = destination
        }
    }

    public struct SnapshotFailed: EventPayload {
        public static let source = EventSource.vm
        public static let name = "snapshot-failed"
        public static let example = SnapshotFailed(error: "cannot create memory file /full/memory.bin: No space left on device")
        public var error: String

        public init(error: String) {
            self.error = error
        }
    }

    public struct Restoring: EventPayload {
        public static let source = EventSource.vm
        public static let name = "restoring"
        public static let example = Restoring(source: "/var/lib/ferry/vm1.snapshot")
        /// The snapshot's directory.
        public var source: String

        public init(source: String) {
            self.source = source
        }
    }

    public struct Restored: EventPayload {
        public static let source = EventSource.vm
        public static let name = "restored"
        public static let example = Restored()
        public init() {}
    }

    public struct RestoreFailed: EventPayload {
        public static let source = EventSource.vm
        public static let name = "restore-failed"
        public static let example = RestoreFailed(error: "memory file /snap/memory.bin is truncated")
        public var error: String

        public init(error: String) {
            self.error = error
        }
    }
}
