# frozen_string_literal: true

require "securerandom"

module Flowctl
  module ControlPlane
    # The embedded, in-memory control plane: a handler for Flowctl::ControlPlane::Service that
    # implements all six RPCs and remembers every registered processor, source and consumer.
    #
    #   registry = Flowctl::ControlPlane::Registry.new(ttl: 30)
    #   server = Flowctl::Server.new(port: 0, tls: false)
    #   server.handle(Flowctl::ControlPlane::Service, registry)
    #   server.start
    #   registry.components  # => [#<struct Flowctl::ControlPlane::Registry::Component kind=:processor, ...>]
    #
    # Registration assigns an id ("processor-3f9a1c2e") when the request has none, and answers with
    # it. A heartbeat for an id it does not know answers success: false with a message saying so
    # (the heartbeat thread then registers again). A component whose last registration or heartbeat
    # is older than ttl seconds is stale; a later heartbeat makes it fresh again. Thread-safe.
    class Registry
      KINDS = %i[processor source consumer].freeze

      # One registered component, as #components returns it (a frozen snapshot).
      # kind: :processor, :source or :consumer; status: the last heartbeat's status String
      # ("STARTING" until the first heartbeat); metrics: Hash of String => Float;
      # last_heartbeat, registered_at: Time (server clock); reported_at: the timestamp the
      # component put in its last heartbeat (its own clock; nil when it sent none).
      Component = Struct.new(:kind, :id, :endpoint, :metadata, :status, :metrics, :last_heartbeat,
                             :registered_at, :reported_at, :heartbeats, :stale, keyword_init: true) do
        def stale? = stale
      end

      attr_reader :ttl

      # ttl: seconds without a heartbeat after which a component counts as stale.
      # clock: anything with #call returning the current Time (tests pass a fake clock).
      def initialize(ttl: 30, clock: nil)
        raise ArgumentError, "ttl must be a positive number of seconds (given #{ttl.inspect})" unless ttl.is_a?(Numeric) && ttl.positive?

        @ttl = ttl
        @clock = clock || -> { Time.now }
        @lock = Mutex.new
        @entries = {} # [kind, id] => Hash of the Component's fields
      end

      KINDS.each do |kind|
        cap = kind.to_s.capitalize
        response = ControlPlane.const_get(:"Register#{cap}Response")
        beat_response = ControlPlane.const_get(:"#{cap}HeartbeatResponse")
        id_field = :"#{kind}_id"

        # register_processor / register_source / register_consumer (request, call) -> response
        define_method(:"register_#{kind}") do |request, _call = nil|
          id, again = register(kind, request.public_send(id_field), request.endpoint, request.metadata)
          response.new(id_field => id, success: true,
                       message: "#{again ? 're-registered' : 'registered'} #{kind} #{id}")
        end

        # processor_heartbeat / source_heartbeat / consumer_heartbeat (request, call) -> response
        define_method(:"#{kind}_heartbeat") do |request, _call = nil|
          id = request.public_send(id_field)
          if heartbeat(kind, id, request.status, request.metrics, request.timestamp)
            beat_response.new(success: true, message: "heartbeat recorded for #{kind} #{id}")
          else
            beat_response.new(success: false,
                              message: "unknown #{kind} #{id.inspect}: not registered with this control plane, register first")
          end
        end
      end

      # call-seq: registry.components(kind: nil) -> Array of Component (oldest registration first)
      def components(kind: nil)
        raise ArgumentError, "kind must be one of #{KINDS.inspect} (given #{kind.inspect})" unless kind.nil? || KINDS.include?(kind)

        now = @clock.call
        @lock.synchronize do
          @entries.each_value.filter_map { |e| snapshot(e, now) if kind.nil? || e[:kind] == kind }
        end
      end

      # call-seq: registry.component(:processor, "p1") -> Component or nil
      def component(kind, id)
        now = @clock.call
        @lock.synchronize do
          e = @entries[[kind, id]]
          e && snapshot(e, now)
        end
      end

      # Components that missed their TTL.
      def stale_components = components.select(&:stale?)

      # Forgets a component; true when it was known.
      def remove(kind, id)
        @lock.synchronize { !@entries.delete([kind, id]).nil? }
      end

      # Forgets every stale component; returns those it removed.
      def prune
        gone = stale_components
        @lock.synchronize { gone.each { |c| @entries.delete([c.kind, c.id]) } }
        gone
      end

      def size = @lock.synchronize { @entries.size }

      # A text table of the components (what flowctl-controlplane prints).
      def table
        rows = components.map do |c|
          age = c.last_heartbeat ? format("%.1fs ago", @clock.call - c.last_heartbeat) : "-"
          metrics = c.metrics.map { |k, v| "#{k}=#{format_number(v)}" }.join(" ")
          [c.kind.to_s, c.id, c.endpoint.empty? ? "-" : c.endpoint, c.stale? ? "#{c.status} (stale)" : c.status,
           age, metrics.empty? ? "-" : metrics]
        end
        format_table(%w[KIND ID ENDPOINT STATUS LAST_HEARTBEAT METRICS], rows)
      end

      def inspect = "#<Flowctl::ControlPlane::Registry ttl: #{ttl} components: #{size}>"

      private

      def register(kind, id, endpoint, metadata)
        now = @clock.call
        @lock.synchronize do
          id = "#{kind}-#{SecureRandom.hex(4)}" if id.nil? || id.empty?
          entry = @entries[[kind, id]]
          again = !entry.nil?
          entry ||= @entries[[kind, id]] = { kind: kind, id: id.dup.freeze, registered_at: now, metrics: {}.freeze,
                                             status: "STARTING", reported_at: nil, heartbeats: 0 }
          entry.merge!(endpoint: endpoint.dup.freeze, metadata: metadata.to_h.freeze, last_heartbeat: now)
          [id, again]
        end
      end

      def heartbeat(kind, id, status, metrics, timestamp)
        now = @clock.call
        @lock.synchronize do
          entry = @entries[[kind, id]] or return false
          entry[:status] = status.dup.freeze unless status.nil? || status.empty?
          entry[:metrics] = metrics.to_h.freeze
          entry[:reported_at] = timestamp
          entry[:last_heartbeat] = now
          entry[:heartbeats] += 1
          true
        end
      end

      def snapshot(entry, now)
        Component.new(**entry, stale: now - entry[:last_heartbeat] > @ttl).freeze
      end

      # NaN and the infinities are valid doubles a component may report (a rate over an empty
      # interval): they are stored as sent and shown as Ruby writes them ("NaN", "Infinity").
      def format_number(v)
        return v.to_s unless v.is_a?(Numeric) && v.finite?

        v == v.to_i ? v.to_i.to_s : format("%.3g", v)
      end

      def format_table(header, rows)
        return "(no components registered)" if rows.empty?

        widths = header.each_index.map { |i| ([header] + rows).map { |r| r[i].to_s.size }.max }
        ([header] + rows).map { |r| r.each_with_index.map { |cell, i| cell.to_s.ljust(widths[i]) }.join("  ").rstrip }
                         .join("\n")
      end
    end
  end
end
