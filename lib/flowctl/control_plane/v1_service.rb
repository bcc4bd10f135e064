# frozen_string_literal: true

module Flowctl
  module ControlPlane
    class Registry
      # flowctl.v1's ControlPlaneService (FLOWCTL_V1.md) over the Store, with upstream's
      # semantics and without its defects:
      # - service_id = component_id, else component.id, else "<COMPONENT_TYPE_X>-<unix nanos>";
      #   registering an id again overwrites it (HEALTHY, metrics emptied, registered_at =
      #   last_heartbeat = now). assigned_topics: each output event type + ".v1" for sources and
      #   processors. connection_info: {"control_plane_endpoint" => the address it serves on}.
      # - Heartbeat: HEALTH_STATUS_UNKNOWN keeps the status, any other is stored; metrics merge.
      # - ListComponents: HEALTHY only unless include_unhealthy; DiscoverComponents ignores health,
      #   filters by type (UNSPECIFIED = any), event types (any among input or output) and
      #   metadata (all equal). UnregisterComponent succeeds for unknown ids too.
      # - Defects fixed: no `component` -> INVALID_ARGUMENT (upstream crashes); an unknown id ->
      #   NOT_FOUND "service <id> not found" (upstream: UNKNOWN with the same text).
      # Included by Registry; the Flowctl::V1 classes are looked up when a call comes.
      module V1Service
        STATUS_PREFIX = "HEALTH_STATUS_"
        TYPE_KIND = { COMPONENT_TYPE_SOURCE: :source, COMPONENT_TYPE_PROCESSOR: :processor,
                      COMPONENT_TYPE_CONSUMER: :consumer }.freeze
        KIND_TYPE = TYPE_KIND.invert.merge(unspecified: :COMPONENT_TYPE_UNSPECIFIED).freeze
        NAMES = %w[UNKNOWN STARTING HEALTHY DEGRADED UNHEALTHY STOPPING].freeze
        # stored status String -> v1 enum Symbol (known names only: nothing a client sends is cached)
        STATUS_SYMBOL = NAMES.to_h { |name| [name, :"#{STATUS_PREFIX}#{name}"] }.freeze
        # v1 enum Symbol -> stored status String; nil = keep the status
        STATUS_TEXT = NAMES.to_h { |name| [:"#{STATUS_PREFIX}#{name}", name] }.merge(HEALTH_STATUS_UNKNOWN: nil).freeze
        # stored status String -> HealthStatus number, for the native table (UNKNOWN is never stored)
        STATUS_CODE = NAMES.each_with_index.to_h.except("UNKNOWN").freeze
        HEARTBEAT_PATH = "/flowctl.v1.ControlPlaneService/Heartbeat"

        # A stored status as the v1 enum: a known name, the number of a status sent as an
        # unknown number, else UNKNOWN (a seed heartbeat's free text).
        def self.status_value(text)
          STATUS_SYMBOL.fetch(text) do
            n = text.match?(/\A[1-9]\d{0,9}\z/) && Integer(text)
            n && n <= 0x7fff_ffff ? n : :HEALTH_STATUS_UNKNOWN # an enum is an int32
          end
        end

        # A heartbeat's status as stored: nil (UNKNOWN: keep it), a name, or an unknown number.
        def self.status_text(value)
          return STATUS_TEXT.fetch(value) { value.to_s } unless value.is_a?(Integer)

          value.zero? ? nil : value.to_s
        end

        def register_component(request, _call = nil)
          info = request.component or
            raise Flowctl::InvalidArgument, "RegisterComponent needs a component (RegisterRequest.component is not set)"

          id = V1Service.service_id(request.component_id, info)
          store.register(id, reset: true, native: true, **V1Service.info_fields(info))
          committed!
          Flowctl::V1::RegisterResponse.new(service_id: id, assigned_topics: V1Service.assigned_topics(info),
                                            connection_info: endpoint ? { "control_plane_endpoint" => endpoint } : {})
        end

        def unregister_component(request, _call = nil)
          committed! if store.unregister(request.service_id)
          V1Service.empty
        end

        def heartbeat(request, _call = nil)
          id = request.service_id
          V1Service.not_found(id) unless store.heartbeat(id, V1Service.status_text(request.status), request.metrics,
                                                         native: true)
          V1Service.empty
        end

        def get_component_status(request, _call = nil)
          c = store.get(request.service_id) or V1Service.not_found(request.service_id)
          V1Service.status_response(c)
        end

        def list_components(request, _call = nil)
          kind = V1Service.kind_of(request.type_filter)
          all = request.include_unhealthy
          list = store.select { |e| (kind == :unspecified || e.kind == kind) && (all || e.status == Store::HEALTHY) }
          Flowctl::V1::ListComponentsResponse.new(components: list.map { |c| V1Service.status_response(c) })
        end

        def discover_components(request, _call = nil)
          kind = V1Service.kind_of(request.type)
          types = request.event_types
          filters = request.metadata_filters
          list = store.select do |e|
            (kind == :unspecified || e.kind == kind) &&
              (types.empty? || types.any? { |t| e.input_event_types.include?(t) || e.output_event_types.include?(t) }) &&
              filters.all? { |k, v| e.metadata[k] == v }
          end
          Flowctl::V1::DiscoveryResponse.new(components: list.map { |c| V1Service.info(c) })
        end

        class << self
          # One frozen google.protobuf.Empty for every reply that is one.
          def empty = @empty ||= Flowctl::Protobuf::Empty.new.freeze

          def service_id(component_id, info)
            return component_id.freeze unless component_id.empty?
            return info.id.freeze unless info.id.empty?

            "#{info.type.is_a?(Symbol) ? info.type : "COMPONENT_TYPE_#{info.type}"}-#{Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)}"
          end

          def kind_of(type) = TYPE_KIND.fetch(type, :unspecified)

          def info_fields(info)
            { kind: kind_of(info.type), protocol: :v1, info_id: info.id.freeze, name: info.name.freeze,
              description: info.description.freeze, version: info.version.freeze,
              input_event_types: info.input_event_types.map(&:freeze).freeze,
              output_event_types: info.output_event_types.map(&:freeze).freeze,
              endpoint: info.endpoint.freeze, metadata: info.metadata.freeze }
          end

          def assigned_topics(info)
            return [] unless %i[COMPONENT_TYPE_SOURCE COMPONENT_TYPE_PROCESSOR].include?(info.type)

            info.output_event_types.map { |t| "#{t}.v1" }
          end

          # A Component as flowctl.v1's ComponentInfo (a seed registration: its id, kind, endpoint
          # and metadata).
          def info(c)
            Flowctl::V1::ComponentInfo.new(id: c.protocol == :v1 ? c.info_id : c.id, name: c.name,
                                           description: c.description, version: c.version, type: KIND_TYPE[c.kind],
                                           input_event_types: c.input_event_types,
                                           output_event_types: c.output_event_types, endpoint: c.endpoint,
                                           metadata: c.metadata)
          end

          def status_response(c)
            Flowctl::V1::ComponentStatusResponse.new(
              component: info(c), status: status_value(c.status), last_heartbeat: c.last_heartbeat,
              metrics: c.metrics.transform_values { |v| v.is_a?(String) ? v : Registry.format_number(v) },
              registered_at: c.registered_at
            )
          end

          def not_found(id)
            raise Flowctl::NotFound, "service #{id} not found"
          end
        end
      end
    end
  end
end
