# frozen_string_literal: true

require "json"
require "flowctl"
require_relative "pipeline/wire"

module Flowctl
  # Service discovery over flowctl.v1's DiscoverComponents: components find each other by
  # type, event types and metadata, and a component can wire its own inputs when no runner
  # wires it (Upstream).
  #
  #   Flowctl::Discovery.discover("127.0.0.1:8080", type: :source, event_types: ["number"])
  #   # => [#<Flowctl::V1::ComponentInfo id: "numbers", endpoint: "127.0.0.1:41234", ...>]
  #   Flowctl::Discovery::Upstream.new("127.0.0.1:8080", %w[numbers]).each { |event| ... }
  #
  # flowctl-pipeline gives every component the ids of its inputs as FLOWCTL_INPUTS
  # ("a,b"; an extension of flowctl run's environment), its input_event_types as
  # FLOWCTL_INPUT_EVENT_TYPES and, with `wiring: discovery`, the StreamRequest params as
  # FLOWCTL_STREAM_PARAMS (a JSON object): Upstream.from_env uses them. A processor whose
  # readers pull from it serves its outputs as a source does (Relay).
  module Discovery
    TYPES = { nil => :COMPONENT_TYPE_UNSPECIFIED, source: :COMPONENT_TYPE_SOURCE, processor: :COMPONENT_TYPE_PROCESSOR,
              consumer: :COMPONENT_TYPE_CONSUMER, sink: :COMPONENT_TYPE_CONSUMER }.freeze

    # No component with these ids registered in time.
    class NotFound < Flowctl::Error; end

    module_function

    def client(control_plane, timeout: 5)
      return control_plane if control_plane.respond_to?(:discover_components)

      klass = Flowctl::V1.const_defined?(:ControlPlaneClient, false) ? Flowctl::V1::ControlPlaneClient : generic_client
      klass.new(control_plane, tls: Heartbeat.loopback?(control_plane) ? false : nil, timeout: timeout)
    end

    def generic_client
      @generic_client ||= Class.new(Flowctl::Client) { use_service Flowctl::V1::ControlPlaneService }
    end

    # ComponentInfos of the components that match: type (:source, :processor, :consumer or
    # nil: any), event_types (any of them among a component's input or output types),
    # metadata (every pair equal). control_plane: "host:port" or a ControlPlaneClient;
    # timeout: the call's deadline in seconds.
    def discover(control_plane, type: nil, event_types: [], metadata: {}, timeout: 5)
      t = TYPES.fetch(type) { raise ArgumentError, "type must be one of #{TYPES.keys.compact.inspect} or nil (given #{type.inspect})" }
      c = client(control_plane, timeout: timeout)
      c.discover_components(type: t, event_types: Array(event_types), metadata_filters: metadata).components
    ensure
      c.close if c && !c.equal?(control_plane)
    end

    # {id => ComponentInfo} of these component ids once every one is registered (polls
    # every 0.1 s); NotFound naming the missing ones after timeout seconds (which also
    # bounds each DiscoverComponents call).
    def resolve(control_plane, ids, timeout: 30)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
      loop do
        found = discover(control_plane, timeout: timeout).select { |i| ids.include?(i.id) && !i.endpoint.empty? }.to_h { |i| [i.id, i] }
        return found if (ids - found.keys).empty?
        if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
          raise NotFound, "not registered with #{control_plane} within #{timeout}s: #{(ids - found.keys).join(', ')}"
        end

        sleep 0.1
      end
    end

    # The events of upstream sources, merged (fan-in), for a component that reads its
    # inputs itself: one StreamEvents per source, resumed after the last event it got when
    # the stream breaks (at-least-once), read ahead into a bounded queue.
    class Upstream
      include Enumerable

      # Errors after which an input is found again and resumed (it went away, or restarts).
      GONE = [Flowctl::Unavailable, Flowctl::Cancelled, IOError].freeze

      # From FLOWCTL_ENDPOINT, FLOWCTL_INPUTS, FLOWCTL_INPUT_EVENT_TYPES and
      # FLOWCTL_STREAM_PARAMS (keywords win); nil when there are no inputs.
      def self.from_env(env = ENV, **opts)
        inputs = Discovery.list(env["FLOWCTL_INPUTS"])
        return nil if inputs.empty?

        opts = { event_types: Discovery.list(env["FLOWCTL_INPUT_EVENT_TYPES"]),
                 params: Discovery.params(env["FLOWCTL_STREAM_PARAMS"]) }.merge(opts)
        new(env.fetch("FLOWCTL_ENDPOINT", "localhost:8080"), inputs, **opts)
      end

      attr_reader :inputs

      # params: StreamRequest params; event_types: only events of these types (empty: all);
      # resume_token: where every input resumes from (a reader's token passed on by a
      # Relay); timeout: how long an input may stay unregistered or unreachable (also
      # after it broke: a restart has that long to register again).
      def initialize(control_plane, inputs, params: {}, event_types: [], resume_token: nil, queue_size: 256, timeout: 30)
        @control_plane = control_plane
        @inputs = inputs
        @params = params
        @event_types = event_types
        @resume_token = resume_token.nil? || resume_token.empty? ? nil : resume_token
        @queue = SizedQueue.new(queue_size)
        @timeout = timeout
        @calls = {}
        @lock = Mutex.new
      end

      # Yields every event of every input until all of them ended; raises the first error.
      def each(&block)
        return enum_for(:each) unless block

        found = Discovery.resolve(@control_plane, @inputs, timeout: @timeout)
        threads = found.map { |id, info| Thread.new { pull(id, info.endpoint) } }
        done = 0
        while done < threads.size
          item = @queue.pop
          if item.is_a?(Exception) then raise item
          elsif item == :done then done += 1
          else yield item
          end
        end
      ensure
        close
        threads&.each { |t| t.join(1) }
      end

      def close
        @lock.synchronize { @calls.each_value(&:cancel) }
        @queue.close
      end

      private

      def pull(id, endpoint)
        token = @resume_token
        attempts = 0
        gone_since = nil
        begin
          client = Flowctl::Pipeline::Wire.client(:SourceClient, endpoint)
          call = client.stream_events_stream(params: @params, resume: !token.nil?, resume_token: token.to_s)
          @lock.synchronize { @calls[id] = call }
          call.each do |event|
            @queue.push(event) if @event_types.empty? || @event_types.include?(event.type)
            token = event.metadata["resume_token"] || event.id
            attempts = 0
            gone_since = nil
          end
          @queue.push(:done)
        rescue *GONE
          raise if @queue.closed?

          gone_since ||= monotonic
          raise if monotonic - gone_since > @timeout

          attempts += 1
          sleep [0.05 * attempts, 0.5].min
          endpoint = Discovery.resolve(@control_plane, [id], timeout: @timeout)[id].endpoint
          retry
        ensure
          client&.close
        end
      rescue ClosedQueueError
        nil
      rescue StandardError => e
        @queue.push(Flowctl::Error.new("input #{id.inspect}: #{e.class}: #{e.message}")) rescue nil # rubocop:disable Style/RescueModifier
      end

      def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end

    # The outputs of a processor that reads its inputs itself, served as a source serves
    # its events (a flowctl.v1 SourceService handler: StreamEvents, GetInfo, HealthCheck),
    # so that its readers pull from it as from a source:
    #
    #   relay = Flowctl::Discovery::Relay.from_env { |event| event.dup.tap { |e| e.type = "out" } }
    #   server.handle(Flowctl::V1::SourceService, relay)
    #
    # Each StreamEvents call reads the inputs (an Upstream with the caller's params, resumed
    # from the caller's resume token: a reader that reconnects after a restart of the
    # processor resumes the sources behind it) and sends what the block makes of each event:
    # nil (nothing), an Event or an Array of Events. With several inputs the caller's token
    # is given to each of them.
    class Relay
      # From the same environment as Upstream.from_env; nil when there are no inputs.
      def self.from_env(env = ENV, info: nil, **opts, &transform)
        inputs = Discovery.list(env["FLOWCTL_INPUTS"])
        return nil if inputs.empty?

        new(env.fetch("FLOWCTL_ENDPOINT", "localhost:8080"), inputs,
            event_types: Discovery.list(env["FLOWCTL_INPUT_EVENT_TYPES"]), info: info, **opts, &transform)
      end

      # info: the ComponentInfo (or its fields) GetInfo answers.
      def initialize(control_plane, inputs, event_types: [], info: nil, timeout: 30, &transform)
        raise ArgumentError, "Relay needs a block (event -> nil, an Event or an Array of Events)" unless transform

        @control_plane = control_plane
        @inputs = inputs
        @event_types = event_types
        @info = info
        @timeout = timeout
        @transform = transform
      end

      def stream_events(request, call)
        upstream = Upstream.new(@control_plane, @inputs, params: request.params.to_h, event_types: @event_types,
                                                         resume_token: request.resume ? request.resume_token : nil,
                                                         timeout: @timeout)
        upstream.each do |event|
          out = @transform.call(event)
          (out.is_a?(Array) ? out : [out]).each { |e| call.write(e) unless e.nil? }
        end
        nil
      end

      def get_info(_request, _call = nil)
        @info.is_a?(Flowctl::V1::ComponentInfo) ? @info : Flowctl::V1::ComponentInfo.new(**(@info || {}))
      end

      def health_check(_request, _call = nil) = Flowctl::V1::HealthCheckResponse.new(status: :HEALTH_STATUS_HEALTHY)
    end

    # "a, b," -> ["a", "b"]
    def list(text) = text.to_s.split(",").map(&:strip).reject(&:empty?)

    # The JSON object of FLOWCTL_STREAM_PARAMS as {String => String}; ArgumentError when it is not one.
    def params(text)
      return {} if text.nil? || text.strip.empty?

      value = JSON.parse(text)
      raise ArgumentError, "FLOWCTL_STREAM_PARAMS must be a JSON object (given #{text[0, 60].inspect})" unless value.is_a?(Hash)

      value.transform_values(&:to_s)
    rescue JSON::ParserError => e
      raise ArgumentError, "FLOWCTL_STREAM_PARAMS is not JSON: #{e.message[0, 80]}"
    end
  end
end
