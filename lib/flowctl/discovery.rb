# frozen_string_literal: true

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
  # ("a,b"; an extension of flowctl run's environment): Upstream.from_env uses them.
  module Discovery
    TYPES = { nil => :COMPONENT_TYPE_UNSPECIFIED, source: :COMPONENT_TYPE_SOURCE, processor: :COMPONENT_TYPE_PROCESSOR,
              consumer: :COMPONENT_TYPE_CONSUMER, sink: :COMPONENT_TYPE_CONSUMER }.freeze

    # No component with these ids registered in time.
    class NotFound < Flowctl::Error; end

    module_function

    def client(control_plane)
      return control_plane if control_plane.respond_to?(:discover_components)

      klass = Flowctl::V1.const_defined?(:ControlPlaneClient, false) ? Flowctl::V1::ControlPlaneClient : generic_client
      klass.new(control_plane, tls: Heartbeat.loopback?(control_plane) ? false : nil, timeout: 5)
    end

    def generic_client
      @generic_client ||= Class.new(Flowctl::Client) { use_service Flowctl::V1::ControlPlaneService }
    end

    # ComponentInfos of the components that match: type (:source, :processor, :consumer or
    # nil: any), event_types (any of them among a component's input or output types),
    # metadata (every pair equal). control_plane: "host:port" or a ControlPlaneClient.
    def discover(control_plane, type: nil, event_types: [], metadata: {})
      t = TYPES.fetch(type) { raise ArgumentError, "type must be one of #{TYPES.keys.compact.inspect} or nil (given #{type.inspect})" }
      c = client(control_plane)
      c.discover_components(type: t, event_types: Array(event_types), metadata_filters: metadata).components
    ensure
      c.close if c && !c.equal?(control_plane)
    end

    # {id => ComponentInfo} of these component ids once every one is registered (polls
    # every 0.1 s); NotFound naming the missing ones after timeout seconds.
    def resolve(control_plane, ids, timeout: 30)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
      loop do
        found = discover(control_plane).select { |i| ids.include?(i.id) && !i.endpoint.empty? }.to_h { |i| [i.id, i] }
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

      RETRIES = 10

      # From FLOWCTL_ENDPOINT and FLOWCTL_INPUTS; nil when there are no inputs.
      def self.from_env(env = ENV, **opts)
        inputs = env.fetch("FLOWCTL_INPUTS", "").split(",").map(&:strip).reject(&:empty?)
        inputs.empty? ? nil : new(env.fetch("FLOWCTL_ENDPOINT", "localhost:8080"), inputs, **opts)
      end

      attr_reader :inputs

      def initialize(control_plane, inputs, params: {}, queue_size: 256, timeout: 30)
        @control_plane = control_plane
        @inputs = inputs
        @params = params
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
        token = nil
        attempts = 0
        begin
          client = Flowctl::Pipeline::Wire.client(:SourceClient, endpoint)
          call = client.stream_events_stream(params: @params, resume: !token.nil?, resume_token: token.to_s)
          @lock.synchronize { @calls[id] = call }
          call.each do |event|
            @queue.push(event)
            token = event.metadata["resume_token"] || event.id
            attempts = 0
          end
          @queue.push(:done)
        rescue Flowctl::Unavailable
          attempts += 1
          raise if attempts > RETRIES

          sleep 0.1 * attempts
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
    end
  end
end
