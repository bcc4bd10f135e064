# frozen_string_literal: true

module Flowctl
  module Component
    # A source yields Events for a StreamRequest:
    #
    #   class Counter < Flowctl::Component::Source
    #     info name: "counter", version: "1.0.0", output_event_types: ["count"]
    #     def each_event(request)
    #       from = Integer(request.params.fetch("start_ledger", "1"))
    #       (from..).each { |n| yield Flowctl::V1::Event.new(id: n.to_s, type: "count", payload: n.to_s) }
    #     end
    #   end
    #
    # It serves SourceService.StreamEvents (server streaming; request.params, request.resume and
    # request.resume_token as the caller sent them), GetState and SaveState (backed by
    # #state_store; a source may also override #get_state / #save_state). Each yield returns
    # once the event is queued on the stream: a slow reader slows the source (gRPC flow
    # control), nothing is buffered without bound. At shutdown the source's method is ended at
    # its next yield (or raised out of a wait); events it yielded were all sent.
    class Source < Base
      def self.kind = :source

      def each_event(_request)
        raise NotImplementedError, "#{self.class} must define each_event(request) and yield events"
      end

      # The store behind GetState/SaveState (in memory unless overridden).
      def state_store = @state_store ||= StateStore.new

      # {state:, resume_token:, last_updated_unix:} for key.
      def get_state(key) = state_store.get(key)

      def save_state(key, state) = state_store.save(key, state)

      # The flowctl.v1 SourceService handler.
      class Handler
        include Services::Common

        def stream_events(request, call)
          id = @runtime.settings.id
          @runtime.stream do |tally|
            @runtime.gate.pass do
              catch(:flowctl_stop) do
                @runtime.interruptible do
                  @component.each_event(request) { |value| emit(call, value, id, tally) }
                end
              end
            end
          end
          @runtime.check_stopping
        end

        def get_state(request)
          Flowctl::V1::StateResponse.new(**@component.get_state(request.key))
        end

        def save_state(request)
          @component.save_state(request.key, request.state)
          Flowctl::Protobuf::Empty.new
        end

        private

        # One yielded event: sent, or counted as failed when it is not an event. Ends the
        # source's method (throw) once the component is stopping.
        def emit(call, value, id, tally)
          @runtime.streams_critical do
            event = begin
              Services.event(value, id)
            rescue StandardError => e
              @runtime.metrics.failed
              @runtime.failed(value, e)
              nil
            end
            if event
              call.write(event)
              tally.emitted!
            end
          end
          throw :flowctl_stop if @runtime.stopping?
          nil
        end
      end
    end
  end
end
