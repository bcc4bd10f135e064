# frozen_string_literal: true

require "securerandom"

module Flowctl
  module ControlPlane
    class Registry
      # The seed's obsrvr.flow.controlplane.ControlPlane (six unary RPCs) over the Store:
      # register_processor / register_source / register_consumer and their heartbeats.
      #
      # Registration assigns "<kind>-<8 hex>" when the request has no id; registering a known id
      # again updates its endpoint and metadata and keeps its registered_at, status and metrics
      # (a new one is STARTING until a heartbeat says otherwise). A heartbeat's status is free
      # text: "" (and "UNKNOWN") keep the status as it is, "HEALTH_STATUS_X" is stored as "X".
      # Metrics merge key by key, as flowctl.v1's do. A heartbeat for an id the control plane does
      # not know, or knows as another kind, answers success: false (the heartbeat thread then
      # registers again); a heartbeat it records answers success: true, "heartbeat recorded".
      # Included by Registry.
      module SeedService
        KINDS = %i[processor source consumer].freeze

        KINDS.each do |kind|
          cap = kind.to_s.capitalize
          response = ControlPlane.const_get(:"Register#{cap}Response")
          beat_response = ControlPlane.const_get(:"#{cap}HeartbeatResponse")
          id_field = :"#{kind}_id"
          recorded = beat_response.new(success: true, message: "heartbeat recorded").freeze

          # register_processor / register_source / register_consumer (request, call) -> response
          define_method(:"register_#{kind}") do |request, _call = nil|
            id = request.public_send(id_field)
            id = "#{kind}-#{SecureRandom.hex(4)}" if id.empty?
            again = store.register(id.freeze, reset: false, kind: kind, protocol: :seed,
                                              endpoint: request.endpoint.freeze, metadata: request.metadata.freeze,
                                              name: "", description: "", version: "", info_id: id,
                                              input_event_types: [].freeze, output_event_types: [].freeze)
            committed!
            response.new(id_field => id, success: true, message: "#{again ? 're-registered' : 'registered'} #{kind} #{id}")
          end

          # processor_heartbeat / source_heartbeat / consumer_heartbeat (request, call) -> response
          define_method(:"#{kind}_heartbeat") do |request, _call = nil|
            id = request.public_send(id_field)
            if store.heartbeat(id, SeedService.status(request.status), request.metrics, kind: kind,
                                                                                        reported_at: request.timestamp)
              recorded # one frozen reply: heartbeats are the hot path
            else
              beat_response.new(success: false,
                                message: "unknown #{kind} #{id.inspect}: not registered with this control plane, register first")
            end
          end
        end

        # The stored status for a seed heartbeat's status text (nil: keep the current one).
        def self.status(text)
          return nil if text.empty? || text == "UNKNOWN" || text == "HEALTH_STATUS_UNKNOWN"

          -(text.start_with?("HEALTH_STATUS_") ? text.delete_prefix("HEALTH_STATUS_") : text) # interned: no copy per beat
        end
      end
    end
  end
end
