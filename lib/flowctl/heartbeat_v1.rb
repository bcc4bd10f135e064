# frozen_string_literal: true

module Flowctl
  # flowctl.v1 (FLOWCTL_V1.md): the protocol the deployed control plane speaks.
  module V1
    # The flowctl.v1 heartbeat for the native thread (ext/flowctl/heartbeat_wire.c): what
    # its calls send and how their replies read. Field numbers and enum values are those
    # of proto/flowctl/v1/control_plane.proto and common.proto.
    module HeartbeatProtocol
      # HealthStatus: name => number, from the enum
      STATUSES = V1::HealthStatus.values
      STATUS_NAMES = STATUSES.keys.freeze
      # gRPC codes that, with "not found" in the details, mean the control plane forgot
      # the component (upstream answers UNKNOWN "service <id> not found"; NOT_FOUND too).
      FORGOT_CODES = [2, 5].freeze

      PLAN = {
        register_path: V1::ControlPlaneService.rpc(:register_component).path,
        beat_path: V1::ControlPlaneService.rpc(:heartbeat).path,
        unregister_path: V1::ControlPlaneService.rpc(:unregister_component).path, register_first: true,
        register_service_id: 1,                        # RegisterResponse{service_id = 1}
        beat_id: 1, beat_status: 2, beat_metrics: 3,   # HeartbeatRequest{service_id, status enum, metrics map<string,string>}
        status_enum: true, metric_strings: true,       # replies are Empty: the status code says it all
        unregister_id: 1,                              # UnregisterRequest{service_id = 1}
        forgot_codes: FORGOT_CODES, forgot_details: "not found",
        statuses: STATUSES.map { |name, number| [name.to_s, number] },
        stopping: STATUS_NAMES.index(:HEALTH_STATUS_STOPPING)
      }.freeze

      module_function

      # :HEALTHY, "healthy", :HEALTH_STATUS_HEALTHY or 2 -> the index into STATUS_NAMES
      def status_index(status)
        name = case status
               when Integer then STATUSES.key(status)
               when String, Symbol
                 up = status.to_s.upcase
                 up = "HEALTH_STATUS_#{up}" unless up.start_with?("HEALTH_STATUS_")
                 up.to_sym if STATUSES.key?(up.to_sym)
               end
        return STATUS_NAMES.index(name) if name

        short = STATUS_NAMES.map { |n| n.to_s.delete_prefix("HEALTH_STATUS_") }
        raise ArgumentError, "unknown status #{status.inspect} (expected a HealthStatus: one of #{short.join(', ')}, " \
                             "as a Symbol or String, with or without HEALTH_STATUS_, or its number)"
      end

      def status_value(name) = name.to_sym

      # {name => Numeric or String} -> {name => String}: numbers as their decimal text
      # (3 -> "3", 1.5 -> "1.5", Rational(1, 2) -> "0.5"), never rounded to another number.
      def metrics(metrics)
        Heartbeat.check_metrics(metrics, "Numeric or String") { nil }.to_h do |name, value|
          [name.to_s, metric_text(name.to_s, value)]
        end
      end

      def metric_text(name, value)
        case value
        when String then Heartbeat.check_text(value, "metric #{name.inspect}")
        when Integer, Float then value.to_s
        when Numeric then value.respond_to?(:to_digits) ? value.to_digits : Float(value).to_s
        else raise TypeError, "metric #{name.inspect} must be Numeric or String (given #{value.class})"
        end
      end

      # component: a Flowctl::V1::ComponentInfo or a Hash of its fields (the message class
      # checks them) -> a ComponentInfo whose id is `id` unless it has its own; a type
      # may be given as :source, :processor or :consumer.
      def component(component, id)
        info = case component
               when V1::ComponentInfo then component.dup
               when Hash then V1::ComponentInfo.new(**component.transform_keys(&:to_sym).merge(type: component_type(component)))
               else raise TypeError, "component: must be a Hash of ComponentInfo fields or a ComponentInfo (given #{component.class})"
               end
        info.id = id if info.id.empty?
        info
      end

      # :processor -> :COMPONENT_TYPE_PROCESSOR; anything else as given (the class checks it)
      def component_type(component)
        type = component[:type] || component["type"] || 0
        short = :"COMPONENT_TYPE_#{type.to_s.upcase}"
        (type.is_a?(Symbol) || type.is_a?(String)) && V1::ComponentType.values.key?(short) ? short : type
      end

      # :source, :processor, :consumer or :unspecified (an unknown number as it is)
      def kind(info)
        type = info.type
        type.is_a?(Symbol) ? type.to_s.delete_prefix("COMPONENT_TYPE_").downcase.to_sym : type
      end

      # RegisterRequest{component = 1 ComponentInfo, component_id = 2}
      def register_request(info, component_id)
        V1::RegisterRequest.new(component: info, component_id: component_id).to_proto
      end
    end

    # Flowctl::V1::ControlPlaneClient#start_heartbeat (the client includes this module).
    module HeartbeatMethods
      # client.start_heartbeat(component: {...}, interval: nil, status: :HEALTHY, metrics: {},
      #                        component_id: nil, on_error: nil, headers: nil, timeout: nil,
      #                        env: ENV) -> Flowctl::Heartbeat
      #
      # Registers with RegisterComponent (component: the ComponentInfo fields, e.g.
      # {name:, version:, type: :processor, endpoint: "host:port", input_event_types: [...],
      # output_event_types: [...], metadata: {...}}), sends the first Heartbeat at once with
      # status, then one every interval (default FLOWCTL_HEARTBEAT_INTERVAL, else 10 s),
      # on this client's channel with its headers (plus headers:). component_id (and
      # component.id when not given) default to FLOWCTL_COMPONENT_ID (then
      # FLOWCTL_SERVICE_ID, then component[:id]). A control plane that answers "not found"
      # gets the component registered again. #stop sends a STOPPING beat, then
      # UnregisterComponent. #service_id is the id the control plane assigned.
      def start_heartbeat(component: {}, interval: nil, status: :HEALTHY, metrics: {}, component_id: nil,
                          on_error: nil, headers: nil, timeout: nil, env: ENV)
        own = (self.headers if respond_to?(:headers)) || {}
        Heartbeat.start_v1(channel, component: component, interval: interval, status: status, metrics: metrics,
                                    component_id: component_id, on_error: on_error, headers: own.merge(headers || {}),
                                    timeout: timeout, env: env)
      end

      # @api private: Heartbeat.from_env for flowctl.v1 (config: Heartbeat.config_from_env's).
      def self.from_env(kind, config, env, client_opts, opts)
        opts = opts.dup
        register = opts.delete(:register)
        component = (opts.delete(:component) || {}).dup
        component[:type] ||= kind
        if register.is_a?(Hash)
          component[:endpoint] ||= register[:endpoint] if register[:endpoint]
          component[:metadata] ||= register[:metadata] if register[:metadata]
        end
        client = V1::ControlPlaneClient.new(config[:endpoint], **client_opts)
        client.start_heartbeat(component: component, component_id: config[:id], interval: config[:interval], env: env,
                               **opts)
      end
    end
  end

  # As Heartbeat::Starter is to ControlPlane::Client (lib/flowctl/heartbeat.rb).
  V1::ControlPlaneClient.include(V1::HeartbeatMethods)

  class Heartbeat
    class << self
      # The flowctl.v1 heartbeat on a Flowctl::Native::Channel (use
      # V1::ControlPlaneClient#start_heartbeat).
      def start_v1(channel, component: {}, interval: nil, status: :HEALTHY, metrics: {}, component_id: nil,
                   on_error: nil, headers: {}, timeout: nil, env: ENV)
        allocate.tap do |hb|
          hb.send(:init_v1, channel, component, interval, status, metrics, component_id, on_error, headers, timeout, env)
        end
      end

      # "FLOWCTL_COMPONENT_ID", then "FLOWCTL_SERVICE_ID", then component[:id]
      def v1_component_id(component_id, component, env)
        given = component_id || nonempty(env, "FLOWCTL_COMPONENT_ID") || nonempty(env, "FLOWCTL_SERVICE_ID")
        given ||= component[:id] || component["id"] if component.is_a?(Hash)
        given ||= component.id if component.is_a?(V1::ComponentInfo)
        if given.nil? || given.to_s.empty?
          raise ArgumentError, "no component id: give component: {id:} or component_id:, or set FLOWCTL_COMPONENT_ID"
        end

        check_id(given)
      end
    end

    private

    def init_v1(channel, component, interval, status, metrics, component_id, on_error, headers, timeout, env)
      protocol = V1::HeartbeatProtocol
      id = Heartbeat.v1_component_id(component_id, component, env)
      interval ||= Heartbeat.parse_interval(env.fetch("FLOWCTL_HEARTBEAT_INTERVAL", "10s"), name: "FLOWCTL_HEARTBEAT_INTERVAL")
      info = protocol.component(component, id)
      @kind = protocol.kind(info)
      start(channel, protocol, protocol::PLAN, protocol.register_request(info, id),
            id: id, interval: interval, status: status, metrics: metrics, headers: headers, timeout: timeout,
            on_error: on_error)
    end
  end
end
