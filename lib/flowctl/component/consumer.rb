# frozen_string_literal: true

module Flowctl
  module Component
    # A consumer takes each Event:
    #
    #   class Printer < Flowctl::Component::Consumer
    #     info name: "printer", version: "1.0.0", input_event_types: ["squared"]
    #     def consume(event) = puts(event.payload)
    #   end
    #
    # It serves ConsumerService.Consume (client streaming): events are consumed in order, one
    # at a time per stream, and the ConsumeResponse counts what was consumed and what failed
    # (with the first MAX_ERRORS error messages). At shutdown a stream ends after the event it
    # is consuming and still answers: events_consumed is exactly what was consumed.
    class Consumer < Base
      MAX_ERRORS = 100

      def self.kind = :consumer

      def consume(_event)
        raise NotImplementedError, "#{self.class} must define consume(event)"
      end

      # The flowctl.v1 ConsumerService handler.
      class Handler
        include Services::Common

        def consume(requests, _call)
          consumed = failed = 0
          errors = []
          runtime = @runtime
          component = @component
          runtime.stream do |tally|
            while (event = runtime.read(requests))
              result = runtime.run_event(event, tally, outputs: false) { component.consume(event) }
              if result.is_a?(Runtime::Failure)
                failed += 1
                errors << "event #{event.id}: #{result.error.class}: #{result.error.message}" if errors.size < MAX_ERRORS
              else
                consumed += 1
              end
            end
          end
          Flowctl::V1::ConsumeResponse.new(events_consumed: consumed, events_failed: failed, errors: errors)
        end
      end
    end
  end
end
