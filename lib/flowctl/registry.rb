# frozen_string_literal: true

require "socket"
require_relative "control_plane/component"
require_relative "control_plane/store"
require_relative "control_plane/ticker"
require_relative "control_plane/janitor"
require_relative "control_plane/seed_service"
require_relative "control_plane/v1_service"
require_relative "control_plane/table"

module Flowctl
  module ControlPlane
    # The embedded control plane: one set of components served through both protocols, the
    # seed's obsrvr.flow.controlplane.ControlPlane (SeedService) and flowctl.v1's
    # ControlPlaneService (V1Service), so a component registered through either is listed by both.
    #
    #   registry = Flowctl::ControlPlane::Registry.new(ttl: 30, db: "controlplane.db")
    #   server = registry.serve(port: 0)          # a Flowctl::Server with both services, started
    #   # or: server.handle(Flowctl::ControlPlane::Service, registry)
    #   #     server.handle(Flowctl::V1::ControlPlaneService, registry)
    #   registry.components  # => [#<struct Flowctl::ControlPlane::Registry::Component kind=:processor, ...>]
    #   registry.close       # stops the janitor, writes and closes the database
    #
    # Where things are (lib/flowctl/control_plane/): component.rb (Component, Entry), store.rb
    # (the table and its rules, limits), seed_service.rb and v1_service.rb (the two protocols),
    # janitor.rb + ticker.rb (TTL -> UNHEALTHY), persistence.rb (SQLite), table.rb (the text table).
    #
    # ttl: seconds without a heartbeat after which a HEALTHY component is marked UNHEALTHY by the
    # janitor (upstream's --heartbeat-ttl) and counts as stale?. janitor_interval: seconds between
    # janitor runs (upstream's --janitor-interval; nil: no janitor thread, call #sweep).
    # db: an SQLite file to keep the components in (see Persistence; needs ruby-sqlite3).
    # flush_interval: seconds between heartbeat writes to db; refresh_interval: a heartbeat that
    # changes only metrics and time is written when the stored one is older (default ttl / 3);
    # synchronous: SQLite's (NORMAL: a commit survives a crash of the process, FULL: of the machine).
    # limits: Hash overriding Limits.
    # endpoint: "host:port" announced as connection_info's control_plane_endpoint (#serve sets it).
    # clock: anything with #call returning the current Time (tests pass a fake clock).
    # native_heartbeats: a server answers the flowctl.v1 heartbeats that change only metrics and
    # time from its acceptor thread, without Ruby (#native_unary; default true, or
    # FLOWCTL_NATIVE_HEARTBEATS=0 for false). Off with a clock of your own.
    class Registry
      include SeedService
      include V1Service

      KINDS = SeedService::KINDS
      WILDCARD = ["0.0.0.0", "::", "[::]", ""].freeze

      attr_reader :janitor_interval, :db
      # The Persistence of db: (nil without one): later tables (pipeline runs, configuration
      # versions) add Persistence::MIGRATIONS and write through persistence.transaction { |db| }.
      attr_reader :persistence
      attr_accessor :endpoint

      def initialize(ttl: 30, janitor_interval: 10, db: nil, flush_interval: 1.0, refresh_interval: nil,
                     synchronous: "NORMAL", limits: nil, endpoint: nil, clock: nil,
                   native_heartbeats: ENV["FLOWCTL_NATIVE_HEARTBEATS"] != "0")
        @ttl = Registry.seconds(:ttl, ttl)
        @janitor_interval = janitor_interval && Registry.seconds(:janitor_interval, janitor_interval)
        flush_interval = Registry.seconds(:flush_interval, flush_interval)
        @endpoint = endpoint
        @native_heartbeats = native_heartbeats ? true : false
        @clock = clock || -> { Process.clock_gettime(Process::CLOCK_REALTIME) }
        @store = Store.new(ttl: @ttl, clock: clock, limits: Limits.build(limits))
        refresh = Registry.seconds(:refresh_interval, refresh_interval || @ttl / 3.0)
        @db = db && open_db(db, flush_interval, refresh, synchronous)
        @janitor = @janitor_interval && Janitor.new(@store, @janitor_interval)
        ObjectSpace.define_finalizer(self, Registry.closer(@janitor, @persistence))
      end

      def ttl = @store.ttl
      def limits = @store.limits

      # call-seq: registry.components(kind: nil) -> Array of Component (oldest registration first)
      def components(kind: nil)
        kinds = KINDS + [:unspecified]
        raise ArgumentError, "kind must be one of #{kinds.inspect} (given #{kind.inspect})" unless kind.nil? || kinds.include?(kind)

        kind ? @store.select { |e| e.kind == kind } : @store.select
      end

      # call-seq:
      #   registry.component("p1") -> Component or nil
      #   registry.component(:processor, "p1") -> Component or nil (only of that kind)
      def component(kind_or_id, id = nil)
        c = @store.get(id || kind_or_id)
        c if c && (id.nil? || c.kind == kind_or_id)
      end

      # Components that missed their TTL.
      def stale_components = components.select(&:stale?)

      # call-seq: registry.remove("p1") / registry.remove(:processor, "p1") -> true when it was known
      def remove(kind_or_id, id = nil)
        return false if id && component(kind_or_id, id).nil?

        gone = @store.unregister(id || kind_or_id)
        committed!
        gone
      end

      # Forgets every stale component; returns those it removed.
      def prune
        stale_components.each { |c| @store.unregister(c.id) }.tap { committed! }
      end

      # The janitor's pass, now: HEALTHY components past the TTL become UNHEALTHY. -> their ids
      def sweep = @store.sweep

      def size = @store.size

      # Counts every change (a display redraws only when it moved).
      def version = @store.version

      # A text table of the components: at most `rows` of them (nil: all), oldest first. With
      # summary: true, or when rows cuts the list, a line of counts by status and protocol comes
      # first. One pass over the components, plus `rows` rows.
      def table(rows: nil, summary: false)
        by_status, by_protocol, list = @store.summary(rows)
        total = by_status.values.sum
        lines = []
        lines << summary_line(by_status, by_protocol) if summary || list.size < total
        lines << Table.render(list, @clock.call.to_f) unless list.empty? && total.positive?
        lines << "(#{total - list.size} more not shown)" if list.size < total
        lines.join("\n")
      end

      # "12 components: 10 HEALTHY, 2 UNHEALTHY; v1 11, seed 1"
      def summary_line(by_status = nil, by_protocol = nil)
        by_status, by_protocol, = @store.summary(0) if by_status.nil?
        total = by_status.values.sum
        return "0 components" if total.zero?

        "#{total} component#{'s' unless total == 1}: " \
          "#{by_status.map { |s, n| "#{n} #{Table.safe(s)}" }.join(', ')}; " \
          "#{by_protocol.map { |p, n| "#{p} #{n}" }.join(', ')}"
      end

      # call-seq: registry.serve(host: "127.0.0.1", port: 0, **server_options) -> Flowctl::Server (started)
      #
      # Serves both protocols on one port and announces that address in RegisterResponse's
      # connection_info (announce: "host:port" overrides it; a wildcard host announces this
      # machine's hostname). Admission: pool_size workers (default 16) and up to max_waiting calls
      # (default 4096) queued for at most max_wait seconds (default 5) before RESOURCE_EXHAUSTED, so
      # heartbeat bursts queue instead of failing (see Flowctl::Server).
      def serve(host: "127.0.0.1", port: 0, announce: nil, pool_size: 16, max_waiting: 4096, max_wait: 5.0, **opts)
        server = Server.new(host: host, port: port, pool_size: pool_size, max_waiting: max_waiting, max_wait: max_wait,
                            **opts)
        server.handle(Service, self)
        server.handle(Flowctl::V1::ControlPlaneService, self) if defined?(Flowctl::V1::ControlPlaneService)
        bound = server.start
        @endpoint = announce || Registry.announced(host, bound)
        server
      end

      # call-seq: registry.native_unary(rpc) -> Flowctl::Native::BeatTable or nil
      #
      # For Flowctl::Server (it asks every handler that has this method, when it serves without
      # interceptors): what answers rpc's calls on the server's acceptor thread. flowctl.v1's
      # Heartbeat is answered from the store's native table when it only repeats the status (or
      # sends UNKNOWN) and merges metrics within the limits; every other heartbeat, and every
      # other RPC, comes to this registry's methods as before. nil when native_heartbeats is
      # off, with a clock of the caller's, or when a subclass defines its own #heartbeat.
      def native_unary(rpc)
        return nil unless @native_heartbeats && rpc.path == V1Service::HEARTBEAT_PATH &&
                          method(:heartbeat).owner == V1Service

        @store.native_beats(V1Service::STATUS_CODE)
      end

      # Stops the janitor, writes what is pending and closes the database. Idempotent.
      def close
        @janitor&.stop
        @persistence&.close
        nil
      end

      def inspect
        "#<Flowctl::ControlPlane::Registry ttl: #{ttl} components: #{size}#{" db: #{@db}" if @db}>"
      end

      class << self
        # A seed metric (a double) as flowctl.v1's map<string, string> value: integers without
        # ".0", others with every digit (Float#to_s), "NaN", "Infinity", "-Infinity".
        def format_number(v)
          return v.to_s unless v.is_a?(Float)
          return "NaN" if v.nan?
          return v.positive? ? "Infinity" : "-Infinity" if v.infinite?
          return v.to_i.to_s if v == v.round && v.abs < 1e15

          v.to_s
        end

        # "host:port" for connection_info: the host served on, or the hostname for a wildcard.
        def announced(host, port)
          host = Socket.gethostname if WILDCARD.include?(host)
          "#{host.include?(':') && !host.start_with?('[') ? "[#{host}]" : host}:#{port}"
        end

        def seconds(name, value)
          return value if value.is_a?(Numeric) && value.positive? && value.finite?

          raise ArgumentError, "#{name} must be a positive number of seconds (given #{value.inspect})"
        end

        # The finalizer of a registry that was never closed: its threads end after their next
        # run (the writer's is a last flush). No Mutex may be taken in a finalizer.
        def closer(janitor, persistence)
          proc do
            janitor&.stop_later
            persistence&.close_later
          end
        end
      end

      private

      attr_reader :store

      # Registrations and unregistrations reply once they are on disk (with db:).
      def committed! = @persistence&.commit

      def open_db(path, flush_interval, refresh, synchronous)
        require_relative "control_plane/persistence"
        @persistence = Persistence.new(path, flush_interval: flush_interval, synchronous: synchronous)
        @store.restore(@persistence.load)
        @store.persist_refresh = (refresh * 1e9).to_i
        @persistence.attach(@store)
        path
      end
    end
  end
end
