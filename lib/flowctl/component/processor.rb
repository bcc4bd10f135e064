# frozen_string_literal: true

module Flowctl
  module Component
    # A processor maps each Event to zero, one or many Events:
    #
    #   class Square < Flowctl::Component::Processor
    #     info name: "square", version: "1.0.0", input_event_types: ["raw"], output_event_types: ["squared"]
    #     def process(event) = Flowctl::V1::Event.new(id: event.id, type: "squared", payload: (event.payload.to_i**2).to_s)
    #   end
    #   Square.run
    #
    # #process returns nil (no output), an Event, a Hash of its fields, or an Array of them; or
    # it yields its outputs one by one. It serves ProcessorService.Process (a bidi stream: each
    # stream's events are processed in order, one at a time); with protocols: [:v1, :seed] also
    # the seed's ProcessorService (DataMessages; see SeedProcessor).
    class Processor < Base
      def self.kind = :processor

      def process(_event)
        raise NotImplementedError, "#{self.class} must define process(event)"
      end

      # The flowctl.v1 ProcessorService handler.
      class Handler
        include Services::Common

        def process(requests, call)
          @runtime.stream do
            while (event = @runtime.read(requests))
              outputs = Processor.apply(@runtime, @component, event)
              Processor.write(@runtime, call, outputs)
            end
          end
          @runtime.check_stopping
        end
      end

      # The outputs of one event (an Array of Events; empty when it failed).
      def self.apply(runtime, component, event)
        result = runtime.run_event(event) do
          yielded = nil
          returned = component.process(event) { |out| (yielded ||= []) << out }
          Services.events(yielded || returned)
        end
        result.is_a?(Runtime::Failure) ? [] : result
      end

      # Sends outputs; those the peer can no longer take (it went away) count as dropped.
      def self.write(runtime, call, outputs)
        outputs.each_with_index do |out, i|
          call.write(out)
        rescue Flowctl::Error
          runtime.metrics.dropped(outputs.size - i)
          raise
        end
      end
    end
  end
end
