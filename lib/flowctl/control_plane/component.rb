# frozen_string_literal: true

module Flowctl
  module ControlPlane
    class Registry
      # One registered component, as Registry#components returns it: a frozen snapshot.
      #
      # id: the service id (the key: one namespace for both protocols). kind: :source,
      # :processor, :consumer or :unspecified. protocol: :v1 or :seed, the protocol it last
      # registered through. name, description, version, input_event_types,
      # output_event_types: flowctl.v1's ComponentInfo fields ("" / [] for the seed's).
      # info_id: ComponentInfo.id as registered (may differ from id, or be empty).
      # status: a String: "STARTING", "HEALTHY", "DEGRADED", "UNHEALTHY", "STOPPING" (or what a
      # seed heartbeat sent, which is free text). metrics: Hash of String => Float (seed) or
      # String (v1), merged key by key. last_heartbeat, registered_at: Time (server clock);
      # reported_at: the timestamp of the last seed heartbeat (the component's clock) or nil.
      # stale?: no heartbeat for longer than the TTL (whatever the status says).
      Component = Struct.new(:kind, :id, :protocol, :endpoint, :metadata, :status, :metrics, :last_heartbeat,
                             :registered_at, :reported_at, :heartbeats, :stale, :name, :description, :version,
                             :input_event_types, :output_event_types, :info_id, keyword_init: true) do
        def stale? = stale
      end

      # The mutable record behind a Component, owned by the Store and touched only under its
      # lock. Times are Integer nanoseconds since the epoch (exact, and cheap to store on every
      # heartbeat).
      class Entry
        FIELDS = %i[id kind protocol endpoint metadata status metrics last_heartbeat registered_at reported_at
                    heartbeats name description version input_event_types output_event_types info_id].freeze
        BEAT_FIELDS = %w[status metrics last_heartbeat heartbeats reported_at].freeze
        attr_accessor(*FIELDS)
        attr_accessor :saved_at # Store: when a change of it was last noted for persistence
        attr_accessor :native   # Store: published in the native table (Native::BeatTable)

        def initialize(**fields)
          fields.each { |k, v| public_send(:"#{k}=", v) }
          @metrics ||= {}
          @heartbeats ||= 0
        end

        # A frozen Component (Times, copies of the mutable parts).
        def snapshot(ttl, now)
          Component.new(kind: kind, id: id, protocol: protocol, endpoint: endpoint, metadata: metadata,
                        status: status, metrics: metrics.dup.freeze, last_heartbeat: Entry.time(last_heartbeat),
                        registered_at: Entry.time(registered_at), reported_at: reported_at, heartbeats: heartbeats,
                        stale: now - last_heartbeat > ttl * 1e9, name: name, description: description, version: version,
                        input_event_types: input_event_types, output_event_types: output_event_types,
                        info_id: info_id).freeze
        end

        def self.time(ns) = Time.at(ns / 1_000_000_000, ns % 1_000_000_000, :nsec)

        # The persisted form (Persistence): plain JSON-able values, copied (metrics change in place).
        def to_row
          FIELDS.to_h { |f| [f.to_s, public_send(f)] }.tap do |h|
            h["kind"] = kind.to_s
            h["protocol"] = protocol.to_s
            h["metrics"] = metrics.dup
            h["reported_at"] = reported_at && (reported_at.to_i * 1_000_000_000 + reported_at.nsec)
          end
        end

        # What a heartbeat changes (a :beat write).
        def beat_row
          { "status" => status, "metrics" => metrics.dup, "last_heartbeat" => last_heartbeat, "heartbeats" => heartbeats,
            "reported_at" => reported_at && (reported_at.to_i * 1_000_000_000 + reported_at.nsec) }
        end

        def self.from_row(h)
          fields = FIELDS.to_h { |f| [f, h[f.to_s]] }
          fields[:kind] = fields[:kind].to_sym
          fields[:protocol] = fields[:protocol].to_sym
          fields[:reported_at] = fields[:reported_at] && time(Integer(fields[:reported_at]))
          fields[:last_heartbeat] = Integer(fields[:last_heartbeat])
          fields[:registered_at] = Integer(fields[:registered_at])
          %i[id endpoint status name description version info_id].each { |f| fields[f] = fields[f].to_s.freeze }
          %i[metadata].each { |f| fields[f] = fields[f].to_h.freeze }
          %i[input_event_types output_event_types].each { |f| fields[f] = Array(fields[f]).map(&:freeze).freeze }
          fields[:metrics] = fields[:metrics].to_h
          new(**fields).tap { |e| e.saved_at = e.last_heartbeat }
        end
      end
    end
  end
end
