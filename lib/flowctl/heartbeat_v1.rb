# frozen_string_literal: true

module Flowctl
  # flowctl.v1 (FLOWCTL_V1.md): the protocol the deployed control plane speaks.
  module V1
    # The flowctl.v1 heartbeat for the native thread (ext/flowctl/heartbeat_wire.c): what
    # its calls send and how their replies read. Field numbers and enum values are those
    # of proto/flowctl/v1/control_plane.proto and common.proto.
    module HeartbeatProtocol
      SERVICE = "/flowctl.v1.ControlPlaneService/"
      # HealthStatus: name => number
      STATUSES = {HEALTH_STATUS_UNKNOWN: 0, HEALTH_STATUS_STARTING: 1, HEALTH_STATUS_HEALTHY: 2,
                  HEALTH_STATUS_DEGRADED: 3, HEALTH_STATUS_UNHEALTHY: 4, HEALTH_STATUS_STOPPING: 5}.freeze
      STATUS_NAMES = STATUSES.keys.freeze
      # ComponentType: name => number; a kind (:processor) stands for its COMPONENT_TYPE_ name
      TYPES = {COMPONENT_TYPE_UNSPECIFIED: 0, COMPONENT_TYPE_SOURCE: 1, COMPONENT_TYPE_PROCESSOR: 2,
               COMPONENT_TYPE_CONSUMER: 3}.freeze
      # gRPC codes that, with "not found" in the details, mean the control plane forgot
      # the component (upstream answers UNKNOWN "service <id> not found"; NOT_FOUND too).
      FORGOT_CODES = [2, 5].freeze

      PLAN = {
        register_path: "#{SERVICE}RegisterComponent", beat_path: "#{SERVICE}Heartbeat",
        unregister_path: "#{SERVICE}UnregisterComponent", register_first: true,
        register_service_id: 1,                        # RegisterResponse{service_id = 1}
        beat_id: 1, beat_status: 2, beat_metrics: 3,   # HeartbeatRequest{service_id, status enum, metrics map<string,string>}
        status_enum: true, metric_strings: true,       # replies are Empty: the status code says it all
        unregister_id: 1,                              # UnregisterRequest{service_id = 1}
        forgot_codes: FORGOT_CODES, forgot_details: "not found",
        statuses: STATUSES.map { |name, number| [name.to_s, number] },
        stopping: STATUS_NAMES.index(:HEALTH_STATUS_STOPPING)
      }.freeze

      # ComponentInfo fields: name => [number, kind]
      COMPONENT_FIELDS = {
        id: [1, :string], name: [2, :string], description: [3, :string], version: [4, :string], type: [5, :enum],
        input_event_types: [6, :strings], output_event_types: [7, :strings], endpoint: [8, :string], metadata: [9, :map]
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

      # component: Hash of ComponentInfo fields -> the checked Hash; id: and type: filled in.
      def component(component, id, kind)
        raise TypeError, "component: must be a Hash of ComponentInfo fields (given #{component.class})" unless component.is_a?(Hash)

        info = component.transform_keys { |k| k.is_a?(String) ? k.to_sym : k }
        unknown = info.keys - COMPONENT_FIELDS.keys
        raise ArgumentError, "component: unknown fields #{unknown.inspect} (ComponentInfo has #{COMPONENT_FIELDS.keys.join(', ')})" if unknown.any?

        info[:id] = id if info[:id].nil? || info[:id].to_s.empty?
        info[:type] = component_type(info.fetch(:type, kind))
        COMPONENT_FIELDS.keys.to_h { |name| [name, check_field(name, info[name])] }
      end

      def component_type(type)
        return type if type.is_a?(Integer) && TYPES.value?(type)

        if type.is_a?(String) || type.is_a?(Symbol)
          up = type.to_s.upcase
          up = "COMPONENT_TYPE_#{up}" unless up.start_with?("COMPONENT_TYPE_")
          return TYPES[up.to_sym] if TYPES.key?(up.to_sym)
        end
        raise ArgumentError, "component: unknown type #{type.inspect} (expected :source, :processor, :consumer or a COMPONENT_TYPE_ name)"
      end

      def check_field(name, value)
        kind = COMPONENT_FIELDS.fetch(name)[1]
        what = "component #{name}"
        case kind
        when :string then Heartbeat.check_text(value.nil? ? "" : value, what).to_s
        when :enum then value
        when :strings
          raise TypeError, "#{what} must be an Array of String (given #{value.class})" unless value.nil? || value.is_a?(Array)

          Array(value).map { |v| Heartbeat.check_text(v, what).to_s }
        when :map
          raise TypeError, "#{what} must be a Hash (given #{value.class})" unless value.nil? || value.is_a?(Hash)

          (value || {}).to_h { |k, v| [Heartbeat.check_text(k, "#{what} key").to_s, Heartbeat.check_text(v, "#{what} value").to_s] }
        end
      end

      # RegisterRequest{component = 1 ComponentInfo, component_id = 2}, encoded with the
      # gem's Flowctl::V1 message classes (or, where they are not loaded, by hand).
      def register_request(info, component_id)
        return encode_register(info, component_id) unless V1.const_defined?(:RegisterRequest, false)

        type = TYPES.key(info[:type])
        V1::RegisterRequest.new(component: V1::ComponentInfo.new(**info, type: type), component_id: component_id).to_proto
      end

      # The same bytes as the message classes write (field number order, defaults left out).
      def encode_register(info, component_id)
        component = COMPONENT_FIELDS.each_with_object(+"".b) do |(name, (number, kind)), out|
          value = info[name]
          case kind
          when :string then put_bytes(out, number, value)
          when :enum then put_varint(out, number, value) if value.positive?
          when :strings then value.each { |v| put_bytes(out, number, v, always: true) }
          when :map then value.each { |k, v| put_bytes(out, number, put_bytes(put_bytes(+"".b, 1, k), 2, v), always: true) }
          end
        end
        put_bytes(put_bytes(+"".b, 1, component, always: true), 2, component_id)
      end

      def varint(value)
        out = +"".b
        while value >= 0x80
          out << ((value & 0x7f) | 0x80)
          value >>= 7
        end
        out << value
      end

      def put_varint(out, number, value) = out << varint(number << 3) << varint(value)

      def put_bytes(out, number, bytes, always: false)
        return out if bytes.empty? && !always

        out << varint((number << 3) | 2) << varint(bytes.bytesize) << bytes.b
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
          component[:endpoint] ||= register[:endpoint]
          component[:metadata] ||= register[:metadata]
        end
        client = control_plane_client(config[:endpoint], client_opts)
        args = {component: component, component_id: config[:id], interval: config[:interval], env: env, **opts}
        return client.start_heartbeat(**args) if client.respond_to?(:start_heartbeat) && client.is_a?(HeartbeatMethods)

        Heartbeat.start_v1(client.channel, headers: client.headers.merge(args.delete(:headers) || {}), **args)
      end

      # V1::ControlPlaneClient once it exists; until then any client gives the channel.
      def self.control_plane_client(endpoint, opts)
        klass = V1.const_defined?(:ControlPlaneClient, false) ? V1::ControlPlaneClient : ControlPlane::Client
        klass.new(endpoint, **opts)
      end
    end
  end

  # The client of flowctl.v1's ControlPlaneService gets #start_heartbeat wherever it is
  # defined first (lib/flowctl/v1.rb or here).
  V1::ControlPlaneClient.include(V1::HeartbeatMethods) if V1.const_defined?(:ControlPlaneClient, false)

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
      info = protocol.component(component, id, :unspecified)
      @kind = protocol::TYPES.key(info[:type]).to_s.delete_prefix("COMPONENT_TYPE_").downcase.to_sym
      start(channel, protocol, protocol::PLAN, protocol.register_request(info, id), id: id, interval: interval,
                                                                                   status: status, metrics: metrics, headers: headers, timeout: timeout, on_error: on_error)
    end
  end
end
