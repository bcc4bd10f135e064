# frozen_string_literal: true

module Flowctl
  module Pipeline
    # The links the Router drives, over flowctl.v1 to each component's registered
    # endpoint (plaintext, as flowctl run dials them, 50 MB messages):
    # SourceLink (StreamEvents), ProcessorLink (Process), SinkLink (Consume, one stream per
    # batch, see Router::SINK_BATCH). Each can be cancelled from another thread. #native is
    # the Native::Stream under a link, for the Router's relays (Native::Stream#relay).
    module Wire
      CHANNEL_ARGS = { "grpc.max_receive_message_length" => 50 * 1024 * 1024,
                       "grpc.max_send_message_length" => 50 * 1024 * 1024 }.freeze

      module_function

      # The flowctl.v1 client class of a service (Flowctl::V1::SourceClient, ...): the gem's
      # own when it has one, else one made here from the service.
      def client_class(name)
        @client_classes ||= {}
        @client_classes[name] ||=
          if Flowctl::V1.const_defined?(name, false)
            Flowctl::V1.const_get(name, false)
          else
            service = Flowctl::V1.const_get(name.to_s.sub(/Client\z/, "Service"), false)
            Class.new(Flowctl::Client) { use_service service }
          end
      end

      def client(name, endpoint)
        client_class(name).new(endpoint, tls: false, timeout: 10, channel_args: CHANNEL_ARGS)
      end

      # The link for a component at endpoint. params: StreamRequest params of sources.
      def link(component, endpoint, params: {})
        case component.role
        when :source then SourceLink.new(component, endpoint, params)
        when :processor then ProcessorLink.new(endpoint)
        else SinkLink.new(endpoint)
        end
      end

      # StreamEvents from a source, resumed from a token.
      class SourceLink
        def initialize(component, endpoint, params)
          @component = component
          @client = Wire.client(:SourceClient, endpoint)
          @params = params
          @lock = Mutex.new
          @cancelled = false
        end

        def open(token)
          request = Flowctl::V1::StreamRequest.new(params: @params, resume: !token.nil?, resume_token: token.to_s)
          call = @client.stream_events_stream(request)
          @lock.synchronize do
            @call = call
            call.cancel if @cancelled
          end
        end

        def each(&block)
          @call.each(&block)
        ensure
          close
        end

        def native = @call.__send__(:native_stream)

        # Done with the stream (read to its end, or given up).
        def close = @client.close

        # The token the source saved itself (GetState), for a resume after the runner lost its own.
        def saved_token
          @client.get_state(key: @component.id, timeout: 2).resume_token.then { |t| t.empty? ? nil : t }
        rescue Flowctl::RPCError
          nil
        end

        def cancel
          @lock.synchronize do
            @cancelled = true
            @call&.cancel
          end
        end
      end

      # Process: a bidi stream.
      class ProcessorLink
        def initialize(endpoint)
          @client = Wire.client(:ProcessorClient, endpoint)
          @call = @client.process_stream
        end

        def write(event) = @call.write(event)
        def close_write = @call.close_write
        def native = @call.__send__(:native_stream)

        # The replies were read to their end (by a relay).
        def done = @client.close

        def read
          r = @call.read
          @client.close if r.nil?
          r
        end

        def cancel
          @call.cancel
          @client.close
        end
      end

      # Consume: a client stream per batch; #finish ends the current one and returns its
      # ConsumeResponse (nil when nothing was written).
      class SinkLink
        def initialize(endpoint)
          @client = Wire.client(:ConsumerClient, endpoint)
          @call = nil
          @lock = Mutex.new
        end

        # Called by the sink's driver only (as #finish is): @call is read without the lock
        # while it is open; #cancel, from other threads, never changes it.
        def write(event)
          call = current_call
          begin
            call.write(event)
          rescue IOError
            call.response # the server ended the stream: raise its status instead
            raise
          end
        end

        # The current Consume stream's Native::Stream (one is opened when there is none).
        def native = current_call.__send__(:native_stream)

        # Why the current stream refused a write: the RPCError its status gives (nil when
        # it gave none).
        def failure
          @call&.response
          nil
        rescue Flowctl::RPCError => e
          e
        end

        def finish
          call = @lock.synchronize { @call.tap { @call = nil } }
          return nil unless call

          call.close_write
          call.response
        end

        def cancel
          @lock.synchronize { @call&.cancel }
          @client.close
        end

        private

        # The Consume stream open now (one is opened when there is none).
        def current_call = @call || @lock.synchronize { @call ||= @client.consume_stream }
      end
    end
  end
end
